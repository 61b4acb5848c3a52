"""``eval.py``: a checkpoint scored on one split of a dataset, written to eval.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from ..atomic import write_json_atomic
from ..contract import input_mismatch, inputs_of
from ..errors import ConfigError
from ..models.stitch import SETTING
from ..reports import format_table, short_form
from .common import label_report, load_module, make_datamodule, use_shift_and_stitch
from .console import say


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.data`` (its ``split``, else its val split)."""
    out = Path(cfg.output).expanduser() if cfg.get("output") else Path(cfg.paths.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"output={out} is a file; output names the folder that will hold eval.json "
            f"(e.g. output={out.parent / 'eval'})"
        )
    report_path = out / "eval.json"
    split_wanted = cfg.data.get("split") or cfg.data.get("val_split")
    if report_path.is_file():  # replace an earlier report of this evaluation only
        try:
            earlier = json.loads(report_path.read_text())
            earlier = (
                earlier.get("checkpoint"),
                earlier.get("split"),
                earlier.get("data_root"),
                earlier.get(SETTING, 1),
            )
        except (ValueError, AttributeError):
            earlier = None
        if earlier != (str(cfg.ckpt_path), split_wanted, cfg.data.get("root"), cfg.get(SETTING, 1)):
            raise ConfigError(
                f"{report_path} holds another evaluation "
                + (
                    f"({earlier[0]}, split {earlier[1]}"
                    + (f" of {earlier[2]}" if earlier[2] else "")
                    + (f", {SETTING}={earlier[3]})" if earlier[3] != 1 else ")")
                    if earlier
                    else "(unreadable)"
                )
                + ": choose another output= folder, or move that file away"
            )
    exclude = cfg.get("exclude_absent_classes")  # None: as the checkpoint was scored in training
    module = load_module(
        cfg.ckpt_path, **({} if exclude is None else {"exclude_absent_classes": bool(exclude)})
    )
    shifts = use_shift_and_stitch(module, cfg)
    data_cfg = cfg.data.copy()
    with open_dict(data_cfg):
        split = data_cfg.pop("split", None) or data_cfg.get("val_split")
        # the checkpoint decides the normalisation its weights expect, image group by image
        # group (an RGB-HHA net: its colour stream's and its HHA stream's own)
        data_cfg.normalization = [n.as_dict() for n in module.input_normalizations]
    dm = make_datamodule(data_cfg, val_split=split, test_split=split)  # eval reads this split alone
    heads, expected = module.contract.num_classes, dm.contract.num_classes
    if expected != heads:
        raise ConfigError(
            f"checkpoint {cfg.ckpt_path} predicts {heads} classes but data={cfg.data._target_} has {expected}"
        )
    wants, gives = module.contract, dm.contract
    if (wants.in_channels, wants.streams) != (gives.in_channels, gives.streams):
        raise ConfigError(
            f"checkpoint {cfg.ckpt_path} takes {inputs_of(wants)} but the data gives "
            f"{inputs_of(gives)}: set the data's input to match (NYUDv2: data.modality=...)"
        )
    why = input_mismatch(wants, gives)  # same channels, other kind: an RGB net on HHA images
    if why:
        raise ConfigError(
            f"checkpoint {cfg.ckpt_path} {why}: set the data's input to match"
            + (f" (NYUDv2: data.modality={wants.modality})" if wants.modality else "")
        )
    say(label_report(dm, [split]))
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    trainer.test(module, dm, verbose=False)
    results = module.results["test"]
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "checkpoint": str(cfg.ckpt_path),
        "split": split,
        "data_root": cfg.data.get("root"),
        SETTING: shifts,
        "metrics": short_form(results),
    }
    write_json_atomic(out / "eval.json", report)
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
    say(f"\nwritten: {out / 'eval.json'}")
    return report
