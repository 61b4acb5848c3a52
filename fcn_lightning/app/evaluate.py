"""What eval.py runs: a checkpoint scored on one split, written to eval.json (README.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from ..atomic import write_json_atomic
from ..contract import input_mismatch, inputs_of
from ..data.base import SegmentationDataModule
from ..errors import ConfigError
from ..models.stitch import SETTING
from ..module import FCNModule
from ..reports import format_table, short_form
from .common import label_report, load_module, make_datamodule, use_shift_and_stitch
from .console import say

REPORT = "eval.json"
SAME = ("checkpoint", "split", "data_root", SETTING)  # what makes a report this evaluation's


def check_report(path: Path, wanted: tuple) -> None:
    """Refuse to replace a report of another evaluation (checkpoint, split, data root, shifts)."""
    if not path.is_file():
        return
    try:
        data = json.loads(path.read_text())
        earlier = tuple(data.get(k, 1 if k == SETTING else None) for k in SAME)
    except (ValueError, AttributeError):
        earlier = None
    if earlier == wanted:
        return
    what = "(unreadable)"
    if earlier:
        ckpt, split, root, shifts = earlier
        of = f" of {root}" if root else ""
        what = f"({ckpt}, split {split}{of}" + (f", {SETTING}={shifts})" if shifts != 1 else ")")
    raise ConfigError(
        f"{path} holds another evaluation {what}: choose another output= folder, or move that "
        "file away"
    )


def check_inputs(module: FCNModule, dm: SegmentationDataModule, cfg: DictConfig) -> None:
    """The data gives what the checkpoint takes: its classes per head, channels and kinds."""
    wants, gives, ckpt = module.contract, dm.contract, cfg.ckpt_path
    if wants.num_classes != gives.num_classes:
        raise ConfigError(
            f"checkpoint {ckpt} predicts {wants.num_classes} classes but data="
            f"{cfg.data._target_} has {gives.num_classes}"
        )
    if (wants.in_channels, wants.streams) != (gives.in_channels, gives.streams):
        raise ConfigError(
            f"checkpoint {ckpt} takes {inputs_of(wants)} but the data gives {inputs_of(gives)}: "
            "set the data's input to match (NYUDv2: data.modality=...)"
        )
    why = input_mismatch(wants, gives)  # same channels, other kind: an RGB net on HHA images
    if why:
        raise ConfigError(
            f"checkpoint {ckpt} {why}: set the data's input to match (NYUDv2: "
            f"data.modality={wants.modality})"
        )


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.data`` (its ``split``, else its val split); return the
    report written to ``<output>/eval.json``."""
    out = Path(cfg.output).expanduser() if cfg.get("output") else Path(cfg.paths.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"output={out} is a file; output names the folder that will hold {REPORT} "
            f"(e.g. output={out.parent / 'eval'})"
        )
    split = cfg.data.get("split") or cfg.data.get("val_split")
    which = (str(cfg.ckpt_path), split, cfg.data.get("root"))
    check_report(out / REPORT, (*which, cfg.get(SETTING, 1)))
    exclude = cfg.get("exclude_absent_classes")  # None: as the checkpoint was scored in training
    kept = {} if exclude is None else {"exclude_absent_classes": bool(exclude)}
    module = load_module(cfg.ckpt_path, **kept)
    shifts = use_shift_and_stitch(module, cfg)
    data_cfg = cfg.data.copy()
    with open_dict(data_cfg):
        data_cfg.pop("split", None)
        # the checkpoint decides the normalisation its weights expect, per image group
        data_cfg.normalization = [n.as_dict() for n in module.input_normalizations]
    dm = make_datamodule(data_cfg, val_split=split, test_split=split)  # eval reads this split alone
    check_inputs(module, dm, cfg)
    say(label_report(dm, [split]))
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    trainer.test(module, dm, verbose=False)
    results = module.results["test"]
    out.mkdir(parents=True, exist_ok=True)
    report = dict(zip(SAME, (*which, shifts), strict=True))
    report["metrics"] = short_form(results)
    write_json_atomic(out / REPORT, report)
    say(format_table({f"{module.model.spec.arch} {split}": results}))
    named = {h: "" if module.contract.single else f" ({h})" for h in results}
    for head, block in results.items():
        if block.get("excluded_classes"):
            say(
                f"classes absent from this split, left out of the means{named[head]}: "
                + ", ".join(block["excluded_classes"])
            )
    for head, block in results.items():
        say(f"\nIoU per class{named[head]}:")
        for name, value in block["per_class_IoU"].items():
            say(f"  {name:<20}{'absent' if value is None else f'{100 * value:.1f}'}")
    say(f"\nwritten: {out / REPORT}")
    return report
