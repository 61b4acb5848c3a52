"""Files written whole or not at all: a hidden temporary file beside the target, renamed over
it. A kill or a full disk leaves the previous file (or none), never half of one, and removes the
temporary file; a symlink at the target is replaced rather than followed."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a temporary binary file, then rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    f = open(tmp, "xb")  # "x": never clobbers a file; closed below
    try:
        with f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any, indent: int | None = 2) -> None:
    """``data`` as JSON (NaN refused), written atomically."""
    text = json.dumps(data, indent=indent, allow_nan=False) + "\n"
    write_atomically(path, lambda f: f.write(text.encode()))
