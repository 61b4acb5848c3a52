"""What predict.py runs: a palette label PNG and a colour overlay per input image.

Per input image, at the image's own size (turned as its EXIF orientation says), in the output
folder::

    <name>.png             palette label map (<name>_<head>.png per head of a multi-head model)
    <name>_overlay.jpg     the image blended half and half with the label colours
    predictions.json       manifest: every file predict wrote there -> the input it came from

``<name>`` is the input's stem; inputs whose outputs would share a name (``img.jpg`` and
``img.png``, or ``IMG.JPG`` and ``img.jpg``: names are compared case-insensitively) are named
after their whole file name instead (``img.jpg.png``, ``img.png.png``), with ``-2``, ``-3``...
appended in sorted order if that still clashes.

Safety rules, all checked before anything is written:

- ``output`` may not be the input folder (compared as files, so symlinks and ``.`` count); a
  single input image may write next to itself;
- no planned output (nor the manifest) may be an input file;
- an existing file may be replaced only if the folder's ``predictions.json`` lists it (an
  output of an earlier predict run); any other would-be-overwritten file stops the run.

An input folder is read non-recursively: files with an image suffix (any case), not hidden,
and not listed in a ``predictions.json`` there. An image that cannot be decoded is skipped and
the others are predicted; the run then ends with SystemExit naming every skipped file.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torchvision import tv_tensors

from .atomic import write_atomically
from .data.base import DataError, read_image, voc_palette
from .data.transforms import eval_transforms
from .pipeline import ConfigError, load_module

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
MANIFEST = "predictions.json"
WRITTEN_BY = "fcn-lightning predict"


def head_suffix(head: str) -> str:
    return "" if head == "out" else f"_{head}"


def output_files(stem: str, heads: list[str]) -> list[str]:
    """The files one input writes: a label and an overlay per head."""
    return [f"{stem}{head_suffix(h)}{end}" for h in heads for end in (".png", "_overlay.jpg")]


def output_stems(files: list[Path], heads: list[str]) -> dict[Path, str]:
    """The stem of each input's outputs: its own stem, or its whole file name where names clash."""
    count = Counter(n.casefold() for f in files for n in output_files(f.stem, heads))
    clash = {f for f in files if any(count[n.casefold()] > 1 for n in output_files(f.stem, heads))}
    stems: dict[Path, str] = {}
    taken: set[str] = set()
    for f in sorted(files, key=lambda f: (f in clash, f.name)):  # unclashed first: keep their name
        base = f.name if f in clash else f.stem
        stem, i = base, 1
        while any(n.casefold() in taken for n in output_files(stem, heads)):
            i += 1
            stem = f"{base}-{i}"
        stems[f] = stem
        taken.update(n.casefold() for n in output_files(stem, heads))
    return {f: stems[f] for f in files}


def read_manifest(folder: Path) -> dict[str, str] | None:
    """Output name -> input of the files an earlier run wrote in ``folder`` and that still exist;
    {} without a manifest, None if ``predictions.json`` there is not one predict wrote."""
    path = folder / MANIFEST
    if not (path.exists() or path.is_symlink()):
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != WRITTEN_BY:
        return None
    outputs = data.get("outputs")
    if not isinstance(outputs, dict):
        return None
    return {
        str(k): str(v)
        for k, v in outputs.items()
        if Path(str(k)).name == k and (folder / str(k)).is_file()
    }


def write_manifest(folder: Path, outputs: dict[str, str]) -> None:
    text = json.dumps(
        {"written_by": WRITTEN_BY, "outputs": dict(sorted(outputs.items()))}, indent=2
    )
    write_atomically(folder / MANIFEST, lambda f: f.write((text + "\n").encode()))


def list_inputs(source: Path) -> list[Path]:
    """The image, or the images of a folder (not recursive, no hidden files, no earlier outputs)."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise ConfigError(f"input not found: {source}")
    earlier = read_manifest(source) or {}
    images = sorted(
        p
        for p in source.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )
    files = [p for p in images if p.name not in earlier]
    others = sorted(
        p.name
        for p in source.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.suffix.lower() not in IMAGE_SUFFIXES
        and p.name != MANIFEST
    )
    if others:
        print(
            f"not images ({', '.join(sorted(IMAGE_SUFFIXES))}), left out: {len(others)} file(s): "
            + ", ".join(others[:5])
            + (" ..." if len(others) > 5 else "")
        )
    if not files:
        why = f"; its {len(images)} are outputs of an earlier predict run ({MANIFEST})"
        raise ConfigError(
            f"input folder {source} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            + (why if images else "")
        )
    return files


def identity(path: Path) -> tuple[int, int]:
    """Equal for two paths to one file (through symlinks, hard links, case-insensitive names)."""
    st = path.stat()
    return st.st_dev, st.st_ino


def check_output(out: Path, source: Path, planned: dict[str, Path]) -> dict[str, str]:
    """Refuse an output folder where writing ``planned`` (name -> input) would replace an input
    or a file predict did not write; return what the folder's manifest lists."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is a file, not a folder")
    if not out.is_dir():
        return {}
    if source.is_dir() and os.path.samefile(source, out):
        raise ConfigError(
            f"output {out} is the input folder {source.resolve()}: the predictions would replace "
            f"and mix with the images; pass e.g. output={source / 'predictions'}"
        )
    earlier = read_manifest(out)
    if earlier is None:
        raise ConfigError(
            f"{out / MANIFEST} exists and predict did not write it; refusing to replace it: "
            "pass another output="
        )
    inputs = {identity(p): p for p in planned.values()}
    for name in [*planned, MANIFEST]:
        target = out / name
        if target.exists() and (found := inputs.get(identity(target))):
            raise ConfigError(
                f"output {target} would overwrite the input image {found}; pass another output="
            )
    foreign = [
        name
        for name in planned
        if ((out / name).exists() or (out / name).is_symlink())
        and (name not in earlier or (out / name).is_dir())
    ]
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise ConfigError(
            f"output {out} already holds {', '.join(foreign[:5])}{more}, not written by predict "
            f"(not in its {MANIFEST}); refusing to overwrite: move them or pass another output="
        )
    return earlier


def predict(cfg: DictConfig) -> list[Path]:
    """Write a palette label PNG and a colour overlay per input image, at its own size.

    Returns the label maps written. The rules on names and on what may be replaced are in the
    module docstring; an undecodable image is skipped and reported by SystemExit at the end.
    """
    if not cfg.get("input"):
        raise ConfigError("input is not set: pass input=<image or folder>")
    source = Path(cfg.input).expanduser()
    files = list_inputs(source)
    module = load_module(cfg.ckpt_path)
    heads = [name for name, _ in module.model.spec.heads]
    stems = output_stems(files, heads)
    renamed = [
        f"{p.name} -> {output_files(stems[p], heads)[0]}" for p in files if stems[p] != p.stem
    ]
    if renamed:
        print(f"inputs share a name; their outputs are named after the file: {', '.join(renamed)}")
    planned = {name: p for p in files for name in output_files(stems[p], heads)}
    out = Path(cfg.output).expanduser() if cfg.get("output") else Path(cfg.paths.output_dir)
    earlier = check_output(out, source, planned)
    out.mkdir(parents=True, exist_ok=True)
    # claim the planned names first, so that an interrupted run can be rerun into this folder
    write_manifest(out, {**earlier, **{n: str(p.resolve()) for n, p in planned.items()}})

    transform = eval_transforms(normalization=module.hparams.model.get("normalization", "imagenet"))
    palette = module.hparams.palette or voc_palette()
    flat = [v for c in (list(palette) + [[0, 0, 0]] * 256)[:256] for v in c]
    device = torch.device(
        "cuda" if torch.cuda.is_available() and cfg.get("device", "auto") != "cpu" else "cpu"
    )
    module.to(device)
    written: list[Path] = []
    done: dict[str, str] = {}
    skipped: list[str] = []
    for path in files:
        try:
            image = read_image(path, exif_transpose=True)  # as a photo viewer shows it
        except DataError as err:
            skipped.append(str(err) if str(path) in str(err) else f"{path}: {err}")
            continue
        x = transform(tv_tensors.Image(image)).as_subclass(torch.Tensor).unsqueeze(0).to(device)
        with torch.no_grad():
            preds = {k: v[0].argmax(0).to(torch.uint8).cpu().numpy() for k, v in module(x).items()}
        rgb = image[:3].permute(1, 2, 0).numpy().astype(np.float32)
        for head, label in preds.items():
            lab = Image.fromarray(label, mode="P")
            lab.putpalette(flat)
            overlay = 0.5 * rgb + 0.5 * np.asarray(lab.convert("RGB"), dtype=np.float32)
            blend = Image.fromarray(overlay.round().astype(np.uint8))
            name = f"{stems[path]}{head_suffix(head)}"
            write_atomically(out / f"{name}.png", lambda f, lab=lab: lab.save(f, format="PNG"))
            write_atomically(
                out / f"{name}_overlay.jpg",
                lambda f, im=blend: im.save(f, format="JPEG", quality=92),
            )
            done.update(dict.fromkeys((f"{name}.png", f"{name}_overlay.jpg"), str(path.resolve())))
            written.append(out / f"{name}.png")
    write_manifest(out, {**earlier, **done})
    n = len(written)
    print(
        f"wrote {n} label maps and {n} overlays for {len(files) - len(skipped)} of {len(files)} "
        f"images to {out.absolute()}"
    )
    if skipped:
        what = (
            f"none of the {len(files)} input images could be read"
            if len(skipped) == len(files)
            else f"{len(skipped)} of {len(files)} input images could not be read and were skipped"
        )
        raise SystemExit(what + ":\n" + "\n".join(f"  {s}" for s in skipped))
    return written
