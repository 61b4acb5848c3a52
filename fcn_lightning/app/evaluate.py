"""What eval.py runs: a checkpoint scored on one split, written to eval.json (README.md); by
default on the data the checkpoint was trained with, as its record of ``cfg.data`` holds it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

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
OTHER_DATA = "pass data=... to evaluate on other data"


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


def check_inputs(module: FCNModule, dm: SegmentationDataModule, ckpt: str, target: str) -> None:
    """The data (``target``: its DataModule) gives what the checkpoint takes: its classes per
    head, channels and kinds."""
    wants, gives = module.contract, dm.contract
    if wants.num_classes != gives.num_classes:
        raise ConfigError(
            f"checkpoint {ckpt} predicts {wants.num_classes} classes but data={target} has "
            f"{gives.num_classes}"
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


def data_given() -> list[str] | None:
    """eval.py's command-line data settings as typed (``data=...``, ``data.<key>=...``); None for a
    config composed outside eval.py's Hydra run (then ``cfg.data`` is taken as given)."""
    if not HydraConfig.initialized() or HydraConfig.get().job.config_name != "eval":
        return None
    return [o for o in HydraConfig.get().overrides.task if _key(o).split(".")[0] == "data"]


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def data_settings(
    cfg: DictConfig, recorded: dict[str, Any] | None, given: list[str] | None
) -> tuple[dict[str, Any], str]:
    """The data settings to evaluate on and where they come from: the checkpoint's record with
    the command line's ``data.<key>`` settings in place (``checkpoint``); ``cfg.data`` where the
    command line chose ``data=`` or the config was composed in Python (``given``), or where the
    checkpoint records nothing (``default``: eval.yaml's data group)."""
    switched = given is None or "data" in map(_key, given)
    if recorded is None or switched:
        return OmegaConf.to_container(cfg.data, resolve=True), "given" if switched else "default"
    data, absent = OmegaConf.create(recorded), object()
    for key in map(_key, given):  # key by key, as the command line set (or with ~, removed) them
        value = OmegaConf.select(cfg, key, default=absent)
        if value is absent:
            data.pop(key.split(".", 1)[1], None)
        else:
            OmegaConf.update(data, key.split(".", 1)[1], value, merge=False)
    root = data.get("root")
    if root and not Path(root).expanduser().exists():
        raise ConfigError(
            f"data: as trained, data.root {root}, which is not on this machine: pass "
            "data.root=<where that data is now> (or data=... for other data)"
        )
    return OmegaConf.to_container(data, resolve=True), "checkpoint"


def data_line(source: str, data: dict[str, Any], split: str, given: list[str], ckpt: str) -> str:
    """The line that says which data the checkpoint is scored on, and how to choose other data."""
    root = data.get("root")
    what = f"{data['_target_']}{f', root {root}' if root else ''}, split {split}"
    if source == "given":
        return f"data: as given ({what})"
    if source == "default":
        return (
            f"data: eval.yaml's default ({what}): {ckpt} does not record the data it was trained "
            "on (written before checkpoints kept it, or outside train.py); pass data=<name> "
            "data.root=... to evaluate on that data"
        )
    return f"data: as trained{' with ' + ' '.join(given) if given else ''} ({what}) — {OTHER_DATA}"


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` on the data it was trained with, or on ``cfg.data`` where the
    command line chose ``data=`` or the checkpoint records none (:func:`data_settings`), its
    ``split`` (else its val split); return the report written to ``<output>/eval.json``."""
    out = Path(cfg.output).expanduser() if cfg.get("output") else Path(cfg.paths.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"output={out} is a file; output names the folder that will hold {REPORT} "
            f"(e.g. output={out.parent / 'eval'})"
        )
    exclude = cfg.get("exclude_absent_classes")  # None: as the checkpoint was scored in training
    kept = {} if exclude is None else {"exclude_absent_classes": bool(exclude)}
    module = load_module(cfg.ckpt_path, **kept)
    given = data_given()
    data, source = data_settings(cfg, module.data_record, given)
    split = data.pop("split", None) or data.get("val_split")
    which = (str(cfg.ckpt_path), split, data.get("root"))
    check_report(out / REPORT, (*which, cfg.get(SETTING, 1)))
    say(data_line(source, data, split, given or [], str(cfg.ckpt_path)))
    shifts = use_shift_and_stitch(module, cfg)
    # the checkpoint decides the normalisation its weights expect, per image group
    data["normalization"] = [n.as_dict() for n in module.input_normalizations]
    dm = make_datamodule(data, val_split=split, test_split=split)  # eval reads this split alone
    check_inputs(module, dm, cfg.ckpt_path, data["_target_"])
    say(label_report(dm, [split]))
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    trainer.test(module, dm, verbose=False)
    results = module.results["test"]
    out.mkdir(parents=True, exist_ok=True)
    report = dict(zip(SAME, (*which, shifts), strict=True))
    report["data"] = {"from": source, "command_line": given or [], "settings": data}
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
