"""The staged protocol: a stage's lr however it is entered, per-stage budgets that never beat a
limit given on the command line, honest checkpoint selection, the presets' reference values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import NO_DATA, TINY, cfg_of
from helpers.datasets import write_nyud
from helpers.launcher import cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fcn_lightning.app.checks import check_settings
from fcn_lightning.app.stages import (
    budget,
    entry_of,
    selection,
    stage_lr,
    stages_for,
    trainer_settings,
)
from fcn_lightning.app.train import train
from fcn_lightning.errors import ConfigError, RunInterrupted
from fcn_lightning.models import build_fcn, transfer_stage

# 3 steps per stage, lr cut 100x: 1e-3, 1e-5, 1e-7
STAGED = [o for o in TINY if not o.startswith("trainer.max_steps")] + [
    "trainer.max_steps=3", "stages.fcn16s.lr_factor=0.01", "stages.fcn8s.lr_factor=0.01",
    "optimizer.lr=1e-3",
]  # fmt: skip


def used_lr(out: Path, stage: str, which: str = "last") -> float:
    """The lr the optimizer held when the stage's checkpoint was written (first group)."""
    ckpt = torch.load(out / stage / "checkpoints" / f"{which}.ckpt", weights_only=True)
    assert (
        ckpt["hyper_parameters"]["optimizer"]["lr"]
        == ckpt["optimizer_states"][0]["param_groups"][0]["lr"]
    )
    return ckpt["optimizer_states"][0]["param_groups"][0]["lr"]


def plan(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())["stages"]


def test_stage_lr_is_the_same_staged_by_init_from_and_after_a_resume(tmp_path):
    staged = tmp_path / "staged"
    train(cfg_of("config", STAGED, staged))
    want = {"fcn32s": 1e-3, "fcn16s": 1e-5, "fcn8s": 1e-7}
    assert {s: used_lr(staged, s) for s in want} == pytest.approx(want, rel=1e-9)
    assert "stages.fcn16s.lr_factor 0.01 x stages.fcn8s" in plan(staged)["fcn8s"]["lr_from"]

    # the README's one-stage commands: FCN-16s from the 32s checkpoint, FCN-8s from the 16s one
    for stage, previous in (("fcn16s", "fcn32s"), ("fcn8s", "fcn16s")):
        ckpt = staged / previous / "checkpoints" / "best.ckpt"
        one = tmp_path / f"one-{stage}"
        train(cfg_of("config", [*STAGED, f"arch={stage}", f"arch.init_from={ckpt}"], one))
        assert used_lr(one, stage) == pytest.approx(want[stage], rel=1e-9)
        assert "from arch.init_from" in plan(one)[stage]["lr_from"]

    # FCN-16s stopped by SIGTERM after its first step, then resumed
    resumed = tmp_path / "resumed"
    stop = ["+callbacks.stop._target_=interrupts.SigtermAtStep", "+callbacks.stop.step=1",
            "+callbacks.stop.stage=fcn16s"]  # fmt: skip
    with pytest.raises(RunInterrupted, match="fcn16s stopped by SIGTERM"):
        train(cfg_of("config", [*STAGED, *stop], resumed))
    assert used_lr(resumed, "fcn16s") == pytest.approx(want["fcn16s"], rel=1e-9)
    train(cfg_of("config", [*STAGED, "resume=true"], resumed))
    assert {s: used_lr(resumed, s) for s in want} == pytest.approx(want, rel=1e-9)


def lrs(overrides: list[str]) -> dict[str, float]:
    cfg = cfg_of("config", overrides)
    check_settings(cfg)
    return {s: stage_lr(cfg, s, entry_of(cfg, i))[0] for i, s in enumerate(stages_for(cfg))}


def test_presets_learning_rates_equal_the_references():
    root = "data.root=/nowhere"
    assert lrs(["data=voc", root]) == {"fcn32s": 1e-4, "fcn16s": 1e-6, "fcn8s": 1e-8}
    heavy = {"fcn32s": 1e-10, "fcn16s": 1e-12, "fcn8s": 1e-14}
    assert lrs(["experiment=voc_fcn8s_heavy", root]) == heavy
    # SIFT Flow: 1e-12 for FCN-16s and for FCN-8s (no cut into 8s), staged or by init_from
    sift = {"fcn32s": 1e-10, "fcn16s": 1e-12, "fcn8s": 1e-12}
    assert lrs(["data=siftflow", root, "arch=fcn8s"]) == sift
    assert lrs(["data=siftflow", root, "arch=fcn8s", "arch.init_from=/x.ckpt"]) == {"fcn8s": 1e-12}
    # NYUDv2 RGB-HHA late fusion started from the trained RGB and HHA nets: 1e-12
    streams = "+arch.init_streams={rgb: /rgb.ckpt, hha: /hha.ckpt}"
    assert lrs(["experiment=nyud_rgbhha_32s", root, streams]) == {"fcn32s": 1e-12}
    assert lrs(["experiment=nyud_rgb_32s", root]) == {"fcn32s": 1e-10}
    # a stage trained from ImageNet (not a later stage) keeps optimizer.lr
    assert lrs(["data=voc", root, "arch=fcn16s", "staged=false"]) == {"fcn16s": 1e-4}
    # set outright, it wins
    assert lrs(["data=voc", root, "arch=fcn16s", "stages.fcn16s.lr=3e-5"])["fcn16s"] == 3e-5
    # one cut set: the others keep the recipe's (SIFT Flow: none into 8s; VOC: 100x)
    one = ["stages.fcn16s.lr_factor=0.1"]
    assert lrs(["data=siftflow", root, *one]) == {"fcn32s": 1e-10, "fcn16s": 1e-11, "fcn8s": 1e-11}
    assert lrs(["data=voc", root, *one]) == {"fcn32s": 1e-4, "fcn16s": 1e-5, "fcn8s": 1e-7}


def test_a_stage_lr_set_outright_carries_down_the_chain_and_a_raise_is_refused(tmp_path):
    root = "data.root=/nowhere"
    # FCN-16s set outright: FCN-8s is cut from it (was from optimizer.lr: 1e-8, above 1e-9)
    assert lrs(["data=voc", root, "stages.fcn16s.lr=1e-9"]) == {
        "fcn32s": 1e-4, "fcn16s": 1e-9, "fcn8s": 1e-11,
    }  # fmt: skip
    assert lrs(["data=voc", root, "stages.fcn32s.lr=1e-5"]) == {
        "fcn32s": 1e-5, "fcn16s": 1e-7, "fcn8s": 1e-9,
    }  # fmt: skip
    with pytest.raises(ConfigError, match=r"stages.fcn16s.lr_factor=2 would raise the lr"):
        lrs(["data=voc", root, "stages.fcn16s.lr_factor=2"])
    with pytest.raises(ConfigError, match=r"stages.fcn8s.lr=0.001 is above fcn16s's lr 1e-06.*"
                                          r"set stages.fcn16s.lr too"):  # fmt: skip
        lrs(["data=voc", root, "stages.fcn8s.lr=1e-3"])
    # started from arch.init_from: the same lr as in the staged chain, and the same refusal
    init = ["data=voc", root, "arch=fcn8s", "arch.init_from=/x.ckpt"]
    assert lrs([*init, "stages.fcn16s.lr=1e-9"]) == {"fcn8s": 1e-11}
    with pytest.raises(ConfigError, match=r"stages.fcn8s.lr=0.01 is above fcn16s's lr 1e-06"):
        lrs([*init, "stages.fcn8s.lr=1e-2"])
    assert lrs(["data=voc", root, "arch=fcn16s", "stages.fcn8s.lr_factor=5"])  # not trained
    both = lrs(["data=voc", root, "stages.fcn16s.lr=1e-6", "stages.fcn8s.lr=1e-3"])
    assert both["fcn8s"] == 1e-3  # both set outright: meant
    # in a real staged run, read back from the optimizer
    out = tmp_path / "run"
    train(cfg_of("config", [*STAGED, "stages.fcn16s.lr=1e-6"], out))
    want = {"fcn32s": 1e-3, "fcn16s": 1e-6, "fcn8s": 1e-8}
    assert {s: used_lr(out, s) for s in want} == pytest.approx(want, rel=1e-9)
    assert plan(out)["fcn8s"]["lr_from"] == (
        "stages.fcn16s.lr 1e-06 x stages.fcn8s.lr_factor 0.01 (fcn8s from the stage before)"
    )


@pytest.mark.parametrize("trunk", ["alexnet", "vgg16", "googlenet"])
def test_table1_presets_train_as_the_paper_did(trunk):
    # at least 175 epochs at a fixed lr, the best validation reported (section 4.1)
    overrides = [f"experiment=table1_{trunk}", "data.root=/nowhere"]
    assert limits(overrides) == {"fcn32s": (-1, 175)}
    cfg = cfg_of("config", overrides)
    assert cfg.scheduler.name == "fixed" and cfg.selection == "best"
    select = selection(cfg, cfg.data.val_split, cfg.data.val_split)
    assert (
        select[0] == "best"
        and "note: the val split 'val' is the split this run reports" in (select[1])
    )


def test_heavy_presets_keep_bilinear_upsampling_the_paper_presets_learn_it():
    root = "data.root=/nowhere"
    for preset in ("voc_fcn8s_heavy", "voc_fcn8s_atonce", "siftflow_16s", "nyud_rgb_32s"):
        assert cfg_of("config", [f"experiment={preset}", root]).arch.learnable_upsampling is False
    for preset in ("voc_fcn8s_staged", "voc_fcn32s"):
        assert cfg_of("config", [f"experiment={preset}", root]).arch.learnable_upsampling is True
    assert cfg_of("config", ["experiment=siftflow_16s", root]).exclude_absent_classes is True


@torch.no_grad()
def test_transfer_into_fixed_upsampling_restores_bilinear_kernels():
    learned = build_fcn("fcn16s", num_classes=3, width=0.0625, geometry="same")
    learned.heads["out"].upscore2.weight.add_(0.5)  # as if the 16s stage had learned it
    fixed = build_fcn("fcn8s", num_classes=3, width=0.0625, geometry="same",
                      learnable_upsampling=False)  # fmt: skip
    reference = build_fcn("fcn8s", num_classes=3, width=0.0625, geometry="same")
    transfer_stage(learned, fixed)
    assert torch.equal(fixed.heads["out"].upscore2.weight, reference.heads["out"].upscore2.weight)
    kept = build_fcn("fcn8s", num_classes=3, width=0.0625, geometry="same")
    transfer_stage(learned, kept)  # learnable: the learned kernel carries over
    assert torch.equal(kept.heads["out"].upscore2.weight, learned.heads["out"].upscore2.weight)


def limits(overrides: list[str]) -> dict[str, tuple[int, int]]:
    cfg = cfg_of("config", overrides)
    check_settings(cfg)
    return {
        s: (trainer_settings(cfg, s).max_steps, trainer_settings(cfg, s).max_epochs)
        for s in stages_for(cfg)
    }


def test_per_stage_budgets_never_beat_a_limit_from_the_command_line():
    root = "data.root=/nowhere"
    # the presets: FCN-32s three times as long as FCN-16s and FCN-8s (VOC); 250/250/500 steps
    assert limits(["data=voc", root]) == {"fcn32s": (-1, 30), "fcn16s": (-1, 10), "fcn8s": (-1, 10)}
    assert limits([]) == {"fcn32s": (250, -1), "fcn16s": (250, -1), "fcn8s": (500, -1)}
    # the trap: a limit on the command line applies to every stage, shorter or longer
    assert set(limits(["trainer.max_steps=7"]).values()) == {(7, -1)}
    assert set(limits(["trainer.max_steps=5000"]).values()) == {(5000, -1)}
    assert set(limits(["data=voc", root, "trainer.max_epochs=2"]).values()) == {(-1, 2)}
    # one stage's own budget set apart, the others keep the preset's; a limit beats them all
    one = limits(["stages.fcn16s.max_steps=2"])
    assert one == {"fcn32s": (250, -1), "fcn16s": (2, -1), "fcn8s": (500, -1)}
    assert set(limits(["trainer.max_steps=7", "stages.fcn16s.max_steps=2"]).values()) == {(7, -1)}
    # the reference recipes train every stage alike
    assert set(limits(["experiment=voc_fcn8s_heavy", root]).values()) == {(100000, -1)}
    cfg = cfg_of("config", ["data=voc", root, "arch=fcn16s", "arch.init_from=/x.ckpt"])
    assert budget(cfg, "fcn16s")[0]["max_epochs"] == 10  # the stage's, however it is entered


def test_per_stage_budgets_and_a_command_line_limit_in_real_runs(tmp_path):
    budgets = [o for o in TINY if not o.startswith("trainer.max_steps")] + [
        "trainer.max_steps=-1", "stages.fcn32s.max_steps=3",
        "stages.fcn16s.max_steps=1", "stages.fcn8s.max_steps=2",
    ]  # fmt: skip
    train(cfg_of("config", budgets, tmp_path / "budgets"))
    steps = {
        s: torch.load(tmp_path / "budgets" / s / "checkpoints/last.ckpt", weights_only=True)[
            "global_step"
        ]
        for s in ("fcn32s", "fcn16s", "fcn8s")
    }
    assert steps == {"fcn32s": 3, "fcn16s": 1, "fcn8s": 2}
    assert plan(tmp_path / "budgets")["fcn16s"]["max_steps"] == 1
    train(cfg_of("config", [*budgets, "trainer.max_steps=2"], tmp_path / "capped"))
    for s in steps:
        ckpt = torch.load(tmp_path / "capped" / s / "checkpoints/last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 2, s


def test_a_typed_limit_replaces_the_presets_limits_of_either_kind(tmp_path):
    atonce = ["experiment=voc_fcn8s_atonce", "data.root=/nowhere", "trainer.max_epochs=50"]
    cfg = cfg_of("config", atonce)  # the preset: max_steps 300000; typed: max_epochs 50
    assert budget(cfg, "fcn8s_atonce", typed={"max_epochs"}) == (
        {"max_steps": -1, "max_epochs": 50}, "max_epochs 50 (trainer.max_epochs, typed, every stage)"
    )  # fmt: skip
    # -1 typed: no limit of that kind; the stage's own budget binds, and with none left, refused
    cfg = cfg_of(
        "config", [*atonce[:2], "trainer.max_steps=-1", "stages.fcn8s_atonce.max_epochs=9"]
    )
    assert budget(cfg, "fcn8s_atonce", typed={"max_steps"}) == (
        {"max_steps": -1, "max_epochs": 9}, "max_epochs 9 (stages.fcn8s_atonce.max_epochs)"
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"fcn8s_atonce has no step or epoch limit"):
        check_settings(cfg_of("config", [*atonce[:2], "trainer.max_steps=-1"]))
    # through the command line, the run's plan says where the limit that binds came from
    out = tmp_path / "run"
    result = cli(*TINY, "arch=fcn32s", f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        plan(out)["fcn32s"]["budget_from"] == "max_steps 1 (trainer.max_steps, typed, every stage)"
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["++stages.fcn16.lr_factor=0.1"], r"stages.fcn16: no stage is called 'fcn16'"),
        (["stages.fcn16s.lr_factor=0"], r"stages.fcn16s.lr_factor must be a number > 0, got 0"),
        (["stages.fcn16s.lr_factor=null"], r"stages.fcn16s.lr_factor is not set"),
        (["++stages.fcn32s.lr_factor=0.1"], r"stages.fcn32s.lr_factor: no cut leads into fcn32s"),
        (["++stages.fusion.max_steps=9"], r"stages.fusion.max_steps: stages.fusion holds the lr"),
        (["++stages.fcn61s.lr=1e-5"], r"stages.fcn61s: no stage is called 'fcn61s'"),
        (["stages.fcn16s.lr=-1"], r"stages.fcn16s.lr must be a number > 0"),
        (["stages.fcn16s=100"], r"stages.fcn16s must map settings to values"),
        (["stages.fcn16s.max_steps=-5"], r"stages.fcn16s.max_steps must be a whole number >= 0"),
        (["stages.fcn16s.max_epochs=1.5"], r"stages.fcn16s.max_epochs must be a whole number"),
        (["++stages.fcn16s.max_step=100"], r"stages.fcn16s.max_step is not a Lightning Trainer"),
        (["selection=newest"], r"selection must be one of \('auto', 'best', 'last'\)"),
        (
            ["stages.fcn32s.max_steps=null"],
            r"fcn32s has no step or epoch limit .*trainer.max_steps=N",
        ),
        # the keys the stages node replaced, refused with the new spelling
        (
            ["+stage_lr_factor=0.5"],
            r"stage_lr_factor was replaced: use stages.fcn16s.lr_factor=0.5 "
            r"stages.fcn8s.lr_factor=0.5 stages.fusion.lr_factor=0.5",
        ),
        (["+stage_lr_factor={fcn8s: 1.0}"], r"replaced: use stages.fcn8s.lr_factor=1.0$"),
        (["+stage_lr.fcn16s=1e-5"], r"stage_lr was replaced: use stages.fcn16s.lr=1e-05"),
        (
            ["+stage_budget.fcn32s.max_steps=3"],
            r"stage_budget was replaced: use stages.fcn32s.max_steps=3",
        ),
        (["+stage_budget=null"], r"stage_budget was replaced: use stages.<stage>.max_steps=..."),
        (
            ["+stage_overrides.fcn16s.accumulate_grad_batches=2"],
            r"stage_overrides was replaced: use \+\+stages.fcn16s.accumulate_grad_batches=2",
        ),
    ],
)
def test_protocol_settings_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_settings(cfg_of("config", overrides))


def test_a_stage_alone_takes_other_trainer_arguments(caplog):
    cfg = cfg_of("config", ["++stages.fcn16s.accumulate_grad_batches=3"])
    with caplog.at_level("WARNING", logger="fcn_lightning"):
        check_settings(cfg)
    assert not caplog.text
    got = {s: trainer_settings(cfg, s).accumulate_grad_batches for s in stages_for(cfg)}
    assert got == {"fcn32s": 1, "fcn16s": 3, "fcn8s": 1}
    with caplog.at_level("WARNING", logger="fcn_lightning"):
        check_settings(
            cfg_of("config", ["arch=fcn32s", "++stages.fcn16s.accumulate_grad_batches=3"])
        )
    assert "stages.fcn16s.accumulate_grad_batches: this run does not train fcn16s" in caplog.text


def test_a_replaced_key_on_the_command_line_is_refused_before_hydra(tmp_path):
    done = cli("stage_lr_factor=0.5", "arch=fcn32s", cwd=tmp_path)  # forked: helpers.launcher
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Error: stage_lr_factor was replaced: use stages.fcn16s.lr_factor=0.5" in done.stderr
    assert not any(tmp_path.iterdir())  # no run folder, no outputs/


# --------------------------------------------------------------------------- selection
NYUD = [*NO_DATA, "data=nyud", "data.num_workers=0", "data.batch_size=1", "data.val_batch_size=1",
        "data.batching=pad", "arch.pretrained=null", "arch.geometry=same", "loss.reduction=mean",
        "optimizer=adamw", "optimizer.lr=3e-2", "arch=fcn32s", "trainer.max_steps=6",
        "trainer.val_check_interval=1", "trainer.check_val_every_n_epoch=null"]  # fmt: skip


@pytest.fixture
def nyud(tmp_path):
    ids = {"train": ["5001", "5002"], "val": ["5003", "5006"], "test": ["5004", "5005"]}
    return write_nyud(tmp_path / "nyud", ids)


def val_history(out: Path, stage: str, tag: str = "val/mIoU") -> list[tuple[int, float]]:
    acc = EventAccumulator(str(out / "tensorboard" / stage)).Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_val_split_that_is_the_reported_test_split_selects_the_last_checkpoint(nyud, tmp_path):
    out = tmp_path / "run"
    train(cfg_of("config", [*NYUD, f"data.root={nyud}"], out))  # NYUDv2: val_split=test
    ckpts = out / "fcn32s" / "checkpoints"
    best = torch.load(ckpts / "best.ckpt", weights_only=True)
    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert best["global_step"] == last["global_step"] == 6
    for key, value in last["state_dict"].items():
        if torch.is_tensor(value):
            assert torch.equal(best["state_dict"][key], value), key
    chosen = json.loads((out / "metrics.json").read_text())["fcn32s"]["checkpoint"]
    assert chosen["selected"] == "last" and chosen["step"] == 6
    assert "the val split 'test' is the split this run reports" in chosen["why"]
    assert plan(out)["fcn32s"]["selection"] == "last"


def test_held_out_val_split_selects_the_best_checkpoint_on_it(nyud, tmp_path):
    out = tmp_path / "run"
    held_out = ["data.train_split=train", "data.val_split=val", "data.test_split=test"]
    train(cfg_of("config", [*NYUD, f"data.root={nyud}", *held_out], out))
    scores = [v for _, v in val_history(out, "fcn32s")]
    assert len(scores) == 6  # a validation after each step: no extra point from the final one
    metrics = json.loads((out / "metrics.json").read_text())["fcn32s"]
    assert metrics["checkpoint"]["selected"] == "best"
    best = torch.load(out / "fcn32s" / "checkpoints" / "best.ckpt", weights_only=True)
    top = max(scores)
    assert metrics["mIoU"] == pytest.approx(top, abs=1e-6)  # the maximum over the validations
    first_top = next(i for i, v in enumerate(scores) if v == pytest.approx(top, abs=1e-6)) + 1
    assert best["global_step"] == metrics["checkpoint"]["step"] == first_top  # k-th after step k


def test_a_val_split_sharing_images_with_the_train_split_is_not_held_out(tmp_path):
    # NYUDv2's trainval holds val: named apart from the test split, val is still trained on
    nyud = write_nyud(tmp_path / "nyud", {"train": ["5001", "5002"], "val": ["5003", "5006"],
                                          "test": ["5004", "5005"]})  # fmt: skip
    out = tmp_path / "run"
    splits = ["data.train_split=trainval", "data.val_split=val", "data.test_split=test"]
    train(cfg_of("config", [*NYUD, f"data.root={nyud}", *splits, "trainer.max_steps=2"], out))
    chosen = json.loads((out / "metrics.json").read_text())["fcn32s"]["checkpoint"]
    assert chosen["selected"] == "last" and chosen["step"] == 2
    assert (
        "the val split 'val' is not held out: it shares 2 images with the train split"
        in (chosen["why"])
    )


def test_selection_can_be_forced(nyud, tmp_path):
    cfg = cfg_of("config", [*NYUD, f"data.root={nyud}", "selection=best"], tmp_path / "run")
    train(cfg)
    chosen = json.loads((tmp_path / "run" / "metrics.json").read_text())["fcn32s"]["checkpoint"]
    assert chosen["selected"] == "best" and "note: the val split 'test'" in chosen["why"]
