"""What predict.py runs: a label PNG and an overlay per image and head, and ``predictions.json``;
docs/DEPLOYING.md ("predict.py") gives the names and the rules."""

from __future__ import annotations

import json
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
from ..contract import SINGLE_HEAD, DataContract, inputs_of
from ..data.images import ImageFiles, SizeBatches, collate
from ..data.transforms import eval_transforms
from ..errors import ConfigError, DataError
from ..models.stitch import SETTING
from .common import load_module, quiet, use_shift_and_stitch
from .console import say

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
MANIFEST = "predictions.json"
WRITTEN_BY = "fcn-lightning predict"


def input_normalization(module: Any) -> Any:
    return module.model.normalization


def output_files(stem: str, heads: list[str]) -> list[str]:
    """A label and an overlay per head (``<stem>_<head>`` where the model has several)."""
    names = [stem if h == SINGLE_HEAD else f"{stem}_{h}" for h in heads]
    return [f"{name}{end}" for name in names for end in (".png", "_overlay.jpg")]


def output_stems(files: list[Path], heads: list[str]) -> dict[Path, str]:
    """Each input's stem, or where outputs would share a name (ignoring case) its file name, then
    ``-2``, ``-3``..."""
    count = Counter(n.casefold() for f in files for n in output_files(f.stem, heads))
    clash = {f for f in files if any(count[n.casefold()] > 1 for n in output_files(f.stem, heads))}
    stems, taken = {}, set()
    for f in sorted(files, key=lambda f: (f in clash, f.name)):  # unclashed first: keep their name
        base = f.name if f in clash else f.stem
        stem, i = base, 1
        while any(n.casefold() in taken for n in output_files(stem, heads)):
            i += 1
            stem = f"{base}-{i}"
        stems[f] = stem
        taken.update(n.casefold() for n in output_files(stem, heads))
    return {f: stems[f] for f in files}


def read_manifest(folder: Path) -> tuple[dict[str, str], dict[str, int]] | None:
    """(output -> input, output -> ``shift_stitch``) of an earlier run's files that still exist;
    empty without a manifest, None for a ``predictions.json`` predict did not write."""
    path = folder / MANIFEST
    if not (path.exists() or path.is_symlink()):
        return {}, {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != WRITTEN_BY:
        return None
    outputs, made = data.get("outputs"), data.get(SETTING)
    if not isinstance(outputs, dict):
        return None
    made = made if isinstance(made, dict) else {}
    kept = {str(k): str(v) for k, v in outputs.items() if Path(str(k)).name == k}
    kept = {k: v for k, v in kept.items() if (folder / k).is_file()}
    return kept, {k: made[k] if isinstance(made.get(k), int) else 1 for k in kept}


def write_manifest(folder: Path, outputs: dict[str, str], settings: dict[str, int]) -> None:
    names = sorted(outputs)
    data = {"written_by": WRITTEN_BY, "outputs": {n: outputs[n] for n in names},
            SETTING: {n: settings[n] for n in names}}  # fmt: skip
    text = json.dumps(data, indent=2) + "\n"
    write_atomically(folder / MANIFEST, lambda f: f.write(text.encode()))


def list_inputs(source: Path) -> list[Path]:
    """The image, or the images of a folder (not recursive, no hidden files, no earlier outputs)."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise ConfigError(f"input not found: {source}")
    earlier = (read_manifest(source) or ({}, {}))[0]
    visible = sorted(p for p in source.iterdir() if not p.name.startswith(".") and p.is_file())
    images = [p for p in visible if p.suffix.lower() in IMAGE_SUFFIXES]
    others = [p.name for p in visible if p.suffix.lower() not in IMAGE_SUFFIXES]
    others = [name for name in others if name != MANIFEST]
    known = ", ".join(sorted(IMAGE_SUFFIXES))
    if others:
        more = " ..." if len(others) > 5 else ""
        say(f"not images ({known}), left out: {len(others)} file(s): {', '.join(others[:5])}{more}")
    files = [p for p in images if p.name not in earlier]
    if not files:
        why = f"; its {len(images)} are outputs of an earlier predict run ({MANIFEST})"
        raise ConfigError(
            f"input folder {source} holds no images ({known})" + (why if images else "")
        )
    return files


def check_output(out: Path, source: Path, planned: dict[str, Path]) -> tuple[dict, dict]:
    """Refuse a folder where ``planned`` (name -> input) would replace an input or a file predict
    did not write; return what its manifest lists."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is a file, not a folder")
    if not out.is_dir():
        return {}, {}
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
    identity = lambda p: (p.stat().st_dev, p.stat().st_ino)  # noqa: E731 (links, case)
    inputs = {identity(p): p for p in planned.values()}
    for target in (out / name for name in [*planned, MANIFEST]):
        if target.exists() and (found := inputs.get(identity(target))):
            raise ConfigError(
                f"output {target} would overwrite the input image {found}; pass another output="
            )
    there = [n for n in planned if (out / n).exists() or (out / n).is_symlink()]
    foreign = [n for n in there if n not in earlier[0] or (out / n).is_dir()]
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise ConfigError(
            f"output {out} already holds {', '.join(foreign[:5])}{more}, not written by predict "
            f"(not in its {MANIFEST}); refusing to overwrite: move them or pass another output="
        )
    return earlier


class PredictionFiles(BasePredictionWriter):
    """Writes each batch's label maps and overlays; keeps, by input index, the maps written,
    unreadable images' messages and the true sizes found."""

    def __init__(self, out: Path, files: list, stems: dict[Path, str], contract: DataContract):
        super().__init__(write_interval="batch")
        self.out, self.files, self.stems = out, files, stems
        black = [(0, 0, 0)] * 256  # each palette filled to the 256 entries of a palette PNG
        self.palettes = {h: [v for c in [*head.palette, *black][:256] for v in c]
                         for h, head in contract.heads.items()}  # fmt: skip
        # by input index: the label maps written, why it was skipped, its true size
        self.written, self.skipped, self.resized = {}, {}, {}

    def write_on_batch_end(self, trainer, pl_module, prediction, indices, batch, *_) -> None:
        self.skipped.update((s["index"], s["error"]) for s in batch[1] if "error" in s)
        self.resized.update((s["index"], s["size"]) for s in batch[1] if "resized" in s)
        labels = {k: v.to(torch.uint8).cpu().numpy() for k, v in prediction.items()}
        for i, sample in enumerate(s for s in batch[1] if "rgb" in s):
            rgb = sample["rgb"].astype(np.float32)
            stem = self.stems[self.files[sample["index"]]]
            for head, label in labels.items():
                png, jpg = output_files(stem, [head])
                lab = Image.fromarray(label[i], mode="P")
                lab.putpalette(self.palettes[head])
                overlay = 0.5 * rgb + 0.5 * np.asarray(lab.convert("RGB"), dtype=np.float32)
                blend = Image.fromarray(overlay.round().astype(np.uint8))
                write_atomically(self.out / png, lambda f, im=lab: im.save(f, "PNG"))
                write_atomically(self.out / jpg, lambda f, im=blend: im.save(f, "JPEG", quality=92))
                self.written.setdefault(sample["index"], []).append(self.out / png)


def run_batches(module: Any, dataset: ImageFiles, writer: PredictionFiles, cfg: DictConfig) -> None:
    """``Trainer.predict`` in batches of one size; images whose header lied get a second pass."""
    accelerator = "cpu" if cfg.get("device", "auto") == "cpu" else "auto"
    for again in (False, True):
        batches = SizeBatches(dataset.sizes, int(cfg.get("batch_size", 8)))
        if not len(batches):
            return
        loader = DataLoader(
            dataset, batch_sampler=batches, collate_fn=collate,
            num_workers=int(cfg.get("num_workers", 0)),
            pin_memory=accelerator != "cpu" and torch.cuda.is_available(),
        )  # fmt: skip
        with warnings.catch_warnings(), quiet("pytorch_lightning"):  # predict's own lines only
            warnings.filterwarnings("ignore", ".*(many workers|custom batch sampler|LeafSpec)")
            pl.Trainer(
                accelerator=accelerator, devices=1, logger=False, callbacks=[writer],
                enable_checkpointing=False, enable_model_summary=False,
                enable_progress_bar=sys.stdout.isatty(),
            ).predict(module, dataloaders=loader, return_predictions=False)  # fmt: skip
        dataset.sizes = [writer.resized.get(i) for i in range(len(dataset))]
        for i in writer.resized if again else ():  # its size changed again: being rewritten
            writer.skipped[i] = f"{dataset.files[i]}: changed while it was read"
        writer.resized = {}


def predict(cfg: DictConfig) -> list[Path]:
    """Predict ``cfg.input`` into ``cfg.output``; return the label maps written. Undecodable
    images are skipped, the others predicted, then DataError names them."""
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
    heads = list(module.contract)
    stems = output_stems(files, heads)
    planned_of = lambda p: output_files(stems[p], heads)  # noqa: E731
    renamed = [f"{p.name} -> {planned_of(p)[0]}" for p in files if stems[p] != p.stem]
    if renamed:
        say(f"inputs share a name; their outputs are named after the file: {', '.join(renamed)}")
    planned = {name: p for p in files for name in planned_of(p)}
    out = Path(cfg.output).expanduser() if cfg.get("output") else Path(cfg.paths.output_dir)
    earlier, made = check_output(out, source, planned)
    out.mkdir(parents=True, exist_ok=True)
    # claim the planned names first, so that an interrupted run can be rerun into this folder
    claimed = {**earlier, **{n: str(p.resolve()) for n, p in planned.items()}}
    write_manifest(out, claimed, {**dict.fromkeys(claimed, shifts), **made})

    writer = PredictionFiles(out, files, stems, module.contract)
    dataset = ImageFiles(files, eval_transforms(normalization=input_normalization(module)))
    writer.skipped.update(dataset.read_unopened())  # files that do not even open, named now
    run_batches(module, dataset, writer, cfg)
    done = {n: str(files[i].resolve()) for i in writer.written for n in planned_of(files[i])}
    write_manifest(out, {**earlier, **done}, {**made, **dict.fromkeys(done, shifts)})
    written = [p for i in sorted(writer.written) for p in writer.written[i]]
    skipped = [writer.skipped[i] for i in sorted(writer.skipped)]
    say(
        f"wrote {len(written)} label maps and {len(written)} overlays for "
        f"{len(files) - len(skipped)} of {len(files)} images to {out.absolute()}"
    )
    if skipped:
        what = (
            f"none of the {len(files)} input images could be read"
            if len(skipped) == len(files)
            else f"{len(skipped)} of {len(files)} input images could not be read and were skipped"
        )
        raise DataError(what + ":\n" + "\n".join(f"  {s}" for s in skipped))
    return written
