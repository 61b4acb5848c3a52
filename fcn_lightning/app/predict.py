"""What predict.py runs: a palette label PNG and a colour overlay per input image.

Per input image, at the image's own size (turned as its EXIF orientation says), in the output
folder::

    <name>.png             palette label map (<name>_<head>.png per head of a multi-head model)
    <name>_overlay.jpg     the image blended half and half with the label colours
    predictions.json       manifest: every file predict wrote there -> the input it came from,
                           and -> the shift_stitch it was made with (1: the plain forward)

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

The images go through Lightning's predict loop (``FCNModule.predict_step``), ``batch_size`` of
one size at a time (``data.images``), read by ``num_workers`` loader processes, on the GPU if
there is one (``device=cpu``: never); one callback writes each batch's files as it ends.
``shift_stitch=f`` (f > 1) puts shift-and-stitch (paper, section 3.2; ``models.stitch``) in
place of the model's forward: f * f shifted forwards per image.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from PIL import Image
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from ..atomic import write_atomically
from ..contract import inputs_of
from ..data.images import ImageFiles, SizeBatches, collate
from ..data.transforms import eval_transforms
from ..errors import ConfigError
from ..models.stitch import SETTING
from .common import load_module, use_shift_and_stitch
from .console import say

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
MANIFEST = "predictions.json"
WRITTEN_BY = "fcn-lightning predict"


# what the checkpoint says about its heads, colours and input: read here only
def head_names(module: Any) -> list[str]:
    return list(module.contract)


def head_palette(module: Any, head: str) -> list[tuple[int, int, int]]:
    return list(module.contract.heads[head].palette)


def input_normalization(module: Any) -> Any:
    return module.model.normalization


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


def read_settings(folder: Path, names: dict[str, str]) -> dict[str, int]:
    """The ``shift_stitch`` each of ``names`` (outputs a manifest there lists) was made with; 1
    where the manifest does not say (predict wrote nothing else before the option existed)."""
    try:
        made = json.loads((folder / MANIFEST).read_text()).get(SETTING)
    except (OSError, ValueError, AttributeError):
        made = None
    made = made if isinstance(made, dict) else {}
    return {n: made[n] if isinstance(made.get(n), int) else 1 for n in names}


def write_manifest(folder: Path, outputs: dict[str, str], settings: dict[str, int]) -> None:
    text = json.dumps(
        {
            "written_by": WRITTEN_BY,
            "outputs": dict(sorted(outputs.items())),
            SETTING: {n: settings[n] for n in sorted(outputs)},
        },
        indent=2,
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
        say(
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


class PredictionFiles(BasePredictionWriter):
    """Writes each image's label maps and overlays (atomically) as its batch ends; keeps, by
    input index, the label maps written, unreadable images' messages and true sizes found."""

    def __init__(self, out: Path, files: list[Path], stems: dict[Path, str], palettes: dict):
        super().__init__(write_interval="batch")
        self.out, self.files, self.stems, self.palettes = out, files, stems, palettes
        self.written: dict[int, list[Path]] = {}
        self.skipped: dict[int, str] = {}
        self.resized: dict[int, tuple[int, int]] = {}

    def write_on_batch_end(self, trainer, pl_module, prediction, indices, batch, *_) -> None:
        self.skipped.update((s["index"], s["error"]) for s in batch[1] if "error" in s)
        self.resized.update((s["index"], s["size"]) for s in batch[1] if "resized" in s)
        labels = {k: v.to(torch.uint8).cpu().numpy() for k, v in prediction.items()}
        for i, sample in enumerate(s for s in batch[1] if "rgb" in s):
            rgb = sample["rgb"].astype(np.float32)
            for head, label in labels.items():
                lab = Image.fromarray(label[i], mode="P")
                lab.putpalette(self.palettes[head])
                overlay = 0.5 * rgb + 0.5 * np.asarray(lab.convert("RGB"), dtype=np.float32)
                blend = Image.fromarray(overlay.round().astype(np.uint8))
                name = f"{self.stems[self.files[sample['index']]]}{head_suffix(head)}"
                write_atomically(self.out / f"{name}.png", lambda f, im=lab: im.save(f, "PNG"))
                write_atomically(
                    self.out / f"{name}_overlay.jpg",
                    lambda f, im=blend: im.save(f, format="JPEG", quality=92),
                )
                self.written.setdefault(sample["index"], []).append(self.out / f"{name}.png")


def run_batches(module: Any, dataset: ImageFiles, writer: PredictionFiles, cfg: DictConfig) -> None:
    """``Trainer.predict`` over ``dataset`` in batches of one size; images whose header told
    another size are predicted in a second pass, at their true size."""
    accelerator = "cpu" if cfg.get("device", "auto") == "cpu" else "auto"
    workers, log = int(cfg.get("num_workers", 0)), logging.getLogger("pytorch_lightning")
    for again in (False, True):
        batches = SizeBatches(dataset.sizes, int(cfg.get("batch_size", 8)))
        if not len(batches):
            return
        loader = DataLoader(
            dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
            pin_memory=accelerator != "cpu" and torch.cuda.is_available(),
        )  # fmt: skip
        with warnings.catch_warnings():  # the console keeps to predict's own lines
            warnings.filterwarnings("ignore", ".*(many workers|custom batch sampler|LeafSpec)")
            level = log.level
            log.setLevel(logging.WARNING)
            try:
                pl.Trainer(
                    accelerator=accelerator, devices=1, logger=False, callbacks=[writer],
                    enable_checkpointing=False, enable_model_summary=False,
                    enable_progress_bar=sys.stdout.isatty(),
                ).predict(module, dataloaders=loader, return_predictions=False)  # fmt: skip
            finally:
                log.setLevel(level)
        dataset.sizes = [writer.resized.get(i) for i in range(len(dataset))]
        for i in writer.resized if again else ():  # its size changed again: being rewritten
            writer.skipped[i] = f"{dataset.files[i]}: changed while it was read"
        writer.resized = {}


def predict(cfg: DictConfig) -> list[Path]:
    """Write a palette label PNG and a colour overlay per input image, at its own size, through
    Lightning's predict loop (``FCNModule.predict_step``) on batches of same-sized images.

    Returns the label maps written. The rules on names and on what may be replaced are in the
    module docstring; an undecodable image is skipped and reported by SystemExit at the end.
    """
    if not cfg.get("input"):
        raise ConfigError("input is not set: pass input=<image or folder>")
    if int(cfg.get("batch_size", 8)) < 1 or int(cfg.get("num_workers", 0)) < 0:
        raise ConfigError("batch_size must be 1 or more, num_workers 0 or more")
    source = Path(cfg.input).expanduser()
    files = list_inputs(source)
    module = load_module(cfg.ckpt_path)
    if module.contract.in_channels != 3 or module.contract.streams:
        raise ConfigError(
            f"predict.py reads photos (3 RGB channels); {cfg.ckpt_path} takes "
            f"{inputs_of(module.contract)} (depth or HHA beside RGB): score it on its dataset "
            "with eval.py, which reads every input the data set has"
        )
    shifts = use_shift_and_stitch(module, cfg)
    heads = head_names(module)
    stems = output_stems(files, heads)
    renamed = [
        f"{p.name} -> {output_files(stems[p], heads)[0]}" for p in files if stems[p] != p.stem
    ]
    if renamed:
        say(f"inputs share a name; their outputs are named after the file: {', '.join(renamed)}")
    planned = {name: p for p in files for name in output_files(stems[p], heads)}
    out = Path(cfg.output).expanduser() if cfg.get("output") else Path(cfg.paths.output_dir)
    earlier = check_output(out, source, planned)
    made = read_settings(out, earlier)
    out.mkdir(parents=True, exist_ok=True)
    # claim the planned names first, so that an interrupted run can be rerun into this folder
    claimed = {**earlier, **{n: str(p.resolve()) for n, p in planned.items()}}
    write_manifest(out, claimed, {**dict.fromkeys(claimed, shifts), **made})

    palettes = [(h, head_palette(module, h) + [(0, 0, 0)] * 256) for h in heads]
    flat = {h: [v for c in palette[:256] for v in c] for h, palette in palettes}
    writer = PredictionFiles(out, files, stems, flat)
    dataset = ImageFiles(files, eval_transforms(normalization=input_normalization(module)))
    writer.skipped.update(dataset.read_unopened())  # files that do not even open, named now
    run_batches(module, dataset, writer, cfg)
    written = [p for i in sorted(writer.written) for p in writer.written[i]]
    done = {
        name: str(files[i].resolve())
        for i, labels in writer.written.items()
        for p in labels
        for name in (p.name, f"{p.stem}_overlay.jpg")
    }
    write_manifest(out, {**earlier, **done}, {**made, **dict.fromkeys(done, shifts)})
    skipped = [writer.skipped[i] for i in sorted(writer.skipped)]
    n = len(written)
    say(
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
