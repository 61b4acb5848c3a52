"""What predict.py runs: a label PNG and an overlay per image and head, and ``predictions.json``;
docs/DEPLOYING.md ("predict.py") gives the names and the rules."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import threading
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

from ..atomic import write_atomically, write_json_atomic
from ..contract import SINGLE_HEAD, inputs_of
from ..data.images import ImageFiles, SizeBatches, collate
from ..data.transforms import eval_transforms
from ..errors import ConfigError, DataError, RunInterrupted
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
    """Each input's stem, or its name where outputs would clash (in any case); then -2, -3..."""
    folded = lambda stem: [n.casefold() for n in output_files(stem, heads)]  # noqa: E731
    count = Counter(n for f in files for n in folded(f.stem))
    clash = {f for f in files if any(count[n] > 1 for n in folded(f.stem))}
    stems, taken = {}, set()
    for f in sorted(files, key=lambda f: (f in clash, f.name)):  # unclashed first: keep their name
        base = f.name if f in clash else f.stem
        tries = itertools.chain([base], (f"{base}-{i}" for i in itertools.count(2)))
        stems[f] = next(stem for stem in tries if taken.isdisjoint(folded(stem)))
        taken.update(folded(stems[f]))
    return stems


def read_manifest(folder: Path) -> dict[str, tuple[str, int]] | None:
    """Earlier outputs still there: name -> (input, shift_stitch); None if not predict's."""
    if not os.path.lexists(path := folder / MANIFEST):
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ours = isinstance(data, dict) and data.get("written_by") == WRITTEN_BY
    if not ours or not isinstance(outputs := data.get("outputs"), dict):
        return None
    made = data[SETTING] if isinstance(data.get(SETTING), dict) else {}
    return {name: (str(source), made[name] if isinstance(made.get(name), int) else 1)
            for name, source in outputs.items()
            if Path(name).name == name and (folder / name).is_file()}  # fmt: skip


def write_manifest(folder: Path, entries: dict[str, tuple[str, int]]) -> None:
    names = sorted(entries)
    write_json_atomic(folder / MANIFEST, {"written_by": WRITTEN_BY,
                      "outputs": {n: entries[n][0] for n in names},
                      SETTING: {n: entries[n][1] for n in names}})  # fmt: skip


def list_inputs(source: Path) -> list[Path]:
    """The image, or the images of a folder (not recursive, no hidden files, no earlier outputs)."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise ConfigError(f"input not found: {source}")
    visible = sorted(p for p in source.iterdir() if not p.name.startswith(".") and p.is_file())
    images = [p for p in visible if p.suffix.lower() in IMAGE_SUFFIXES]
    others = sorted({p.name for p in visible} - {p.name for p in images} - {MANIFEST})
    known = ", ".join(sorted(IMAGE_SUFFIXES))
    if others:
        more = " ..." * (len(others) > 5)
        say(f"not images ({known}), left out: {len(others)} file(s): {', '.join(others[:5])}{more}")
    earlier = read_manifest(source) or {}
    if not (files := [p for p in images if p.name not in earlier]):
        why = f"; its {len(images)} are outputs of an earlier predict run ({MANIFEST})"
        raise ConfigError(f"input folder {source} holds no images ({known}){why if images else ''}")
    return files


def check_output(out: Path, source: Path, planned: dict[str, Path]) -> dict[str, tuple[str, int]]:
    """Refuse to replace an input or a file predict did not write; return the manifest's list."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is a file, not a folder")
    if not out.is_dir():
        return {}
    if source.is_dir() and os.path.samefile(source, out):
        raise ConfigError(f"output {out} is the input folder {source.resolve()}: the predictions "
                          "would replace and mix with the images; pass e.g. "
                          f"output={source / 'predictions'}")  # fmt: skip
    if (earlier := read_manifest(out)) is None:
        raise ConfigError(f"{out / MANIFEST} exists and predict did not write it; refusing to "
                          "replace it: pass another output=")  # fmt: skip
    identity = lambda p: (p.stat().st_dev, p.stat().st_ino)  # noqa: E731 (links, case)
    inputs = {identity(p): p for p in planned.values()}
    for target in (out / name for name in [*planned, MANIFEST]):
        if target.exists() and (found := inputs.get(identity(target))):
            raise ConfigError(f"output {target} would overwrite the input image {found}; "
                              "pass another output=")  # fmt: skip
    if foreign := [n for n in planned if n not in earlier and os.path.lexists(out / n)]:
        more = f" and {len(foreign) - 5} more" * (len(foreign) > 5)
        raise ConfigError(f"output {out} already holds {', '.join(foreign[:5])}{more}, not written "
                          f"by predict (not in its {MANIFEST}); refusing to overwrite: move them "
                          "or pass another output=")  # fmt: skip
    return earlier


class PredictionFiles(BasePredictionWriter):
    """Writes label maps and overlays; keeps, by input index, maps written, errors, true sizes."""

    def __init__(self, out: Path, stems: list[str]) -> None:
        super().__init__(write_interval="batch")
        self.out, self.stems = out, stems
        self.written, self.skipped, self.resized = {}, {}, {}

    def write_on_batch_end(self, trainer, pl_module, prediction, indices, batch, *_) -> None:
        self.skipped.update((s["index"], s["error"]) for s in batch[1] if "error" in s)
        self.resized.update((s["index"], s["size"]) for s in batch[1] if "resized" in s)
        labels = {k: v.to(torch.uint8).cpu().numpy() for k, v in prediction.items()}
        for i, sample in enumerate(s for s in batch[1] if "rgb" in s):
            for head, label in labels.items():
                png, jpg = output_files(self.stems[sample["index"]], [head])
                colours = pl_module.contract.heads[head].palette[:256]
                lab = Image.fromarray(label[i])  # mode L; P with the colours filled to 256
                lab.putpalette(bytes(v for c in colours for v in c).ljust(768, b"\0"))
                overlay = 0.5 * sample["rgb"] + 0.5 * np.asarray(lab.convert("RGB"))
                blend = Image.fromarray(overlay.round().astype(np.uint8))
                write_atomically(self.out / png, lambda f, im=lab: im.save(f, "PNG"))
                write_atomically(self.out / jpg, lambda f, im=blend: im.save(f, "JPEG", quality=92))
                self.written.setdefault(sample["index"], []).append(self.out / png)


class Terminated(Exception):
    """SIGTERM while predicting (a batch job's time limit, ``kill``)."""


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated


def run_batches(module: Any, dataset: ImageFiles, writer: PredictionFiles, cfg: DictConfig) -> None:
    """``Trainer.predict`` in batches of one size; images whose header lied get a second pass."""
    accelerator = "cpu" if cfg.get("device", "auto") == "cpu" else "auto"
    for again in (False, True):
        if not (batches := SizeBatches(dataset.sizes, int(cfg.get("batch_size", 8)))).batches:
            return
        loader = DataLoader(
            dataset, batch_sampler=batches, collate_fn=collate,
            num_workers=int(cfg.get("num_workers", 0)),
            pin_memory=accelerator != "cpu" and torch.cuda.is_available(),
        )  # fmt: skip
        with warnings.catch_warnings(), quiet("pytorch_lightning"):  # predict's own lines only
            warnings.filterwarnings("ignore", ".*(many workers|custom batch sampler|LeafSpec)")
            trainer = pl.Trainer(
                accelerator=accelerator, devices=1, logger=False, callbacks=[writer],
                enable_checkpointing=False, enable_model_summary=False,
                enable_progress_bar=sys.stdout.isatty(),
            )  # fmt: skip
            try:
                trainer.predict(module, dataloaders=loader, return_predictions=False)
            except SystemExit:  # Lightning's answer to Ctrl+C: ours is RunInterrupted
                if not trainer.interrupted:
                    raise
                signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores it
                raise KeyboardInterrupt from None
        dataset.sizes = [writer.resized.get(i) for i in range(len(dataset))]
        for i in writer.resized if again else ():  # its size changed again: being rewritten
            writer.skipped[i] = f"{dataset.files[i]}: changed while it was read"
        writer.resized = {}


def predict(cfg: DictConfig) -> list[Path]:
    """Predict ``cfg.input`` into ``cfg.output``; unreadable images are skipped, then named.
    Ctrl+C while predicting: :class:`RunInterrupted`, saying how many were written, and where."""
    if not cfg.get("input"):
        raise ConfigError("input is not set: pass input=<image or folder>")
    if int(cfg.get("batch_size", 8)) < 1 or int(cfg.get("num_workers", 0)) < 0:
        raise ConfigError("batch_size must be 1 or more, num_workers 0 or more")
    source = Path(cfg.input).expanduser()
    files = list_inputs(source)
    module = load_module(cfg.ckpt_path)
    if module.contract.in_channels != 3 or module.contract.streams:
        raise ConfigError(f"predict.py reads photos (3 RGB channels); {cfg.ckpt_path} takes "
                          f"{inputs_of(module.contract)} (depth or HHA beside RGB): score it "
                          "on its dataset with eval.py, which reads every input the data set has")  # fmt: skip
    shifts = use_shift_and_stitch(module, cfg)
    heads = list(module.contract)
    stems = output_stems(files, heads)
    outputs = {p: output_files(stems[p], heads) for p in files}
    if renamed := [f"{p.name} -> {outputs[p][0]}" for p in files if stems[p] != p.stem]:
        say(f"inputs share a name; their outputs are named after the file: {', '.join(renamed)}")
    planned = {name: p for p in files for name in outputs[p]}
    out = Path(cfg.output).expanduser() if cfg.get("output") else Path(cfg.paths.output_dir)
    earlier = check_output(out, source, planned)
    out.mkdir(parents=True, exist_ok=True)
    # claimed first: an interrupted run can be rerun here (old files keep their shift_stitch)
    claimed = {n: (str(p.resolve()), earlier.get(n, ("", shifts))[1]) for n, p in planned.items()}
    write_manifest(out, {**earlier, **claimed})
    writer = PredictionFiles(out, [stems[p] for p in files])
    dataset = ImageFiles(files, eval_transforms(normalization=input_normalization(module)))
    writer.skipped.update(dataset.read_unopened())  # files that do not even open, named now
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main else None
    try:
        run_batches(module, dataset, writer, cfg)
    except (KeyboardInterrupt, Terminated) as err:
        how = "stopped by SIGTERM" if isinstance(err, Terminated) else "interrupted (Ctrl+C)"
        raise RunInterrupted(
            f"predict.py was {how}: {len(writer.written)} of {len(files)} images written (label "
            f"map and overlay each) to {out.absolute()}; run the same command again to predict "
            "them all",
            signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT,
        ) from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        done = {n: (claimed[n][0], shifts) for i in writer.written for n in outputs[files[i]]}
        write_manifest(out, {**earlier, **done})
    written = [p for i in sorted(writer.written) for p in writer.written[i]]
    skipped = [writer.skipped[i] for i in sorted(writer.skipped)]
    say(f"wrote {len(written)} label maps and {len(written)} overlays for "
        f"{len(files) - len(skipped)} of {len(files)} images to {out.absolute()}")  # fmt: skip
    if skipped:
        what = f"{len(skipped)} of {len(files)} input images could not be read and were skipped"
        if len(skipped) == len(files):
            what = f"none of the {len(files)} input images could be read"
        raise DataError(what + ":\n" + "\n".join(f"  {s}" for s in skipped))
    return written
