"""Config composition: a group chosen on the command line always wins over a data set's recipe,
and every combination of the groups gives a config that builds its model, solver and schedule."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from test_app import CONF, cfg_of

from fcn_lightning.pipeline import check_settings, make_datamodule, make_module, stages_for

DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
OPTIMIZERS = sorted(p.stem for p in (CONF / "optimizer").glob("*.yaml"))
SCHEDULERS = sorted(p.stem for p in (CONF / "scheduler").glob("*.yaml"))
ARCHS = sorted(p.stem for p in (CONF / "arch").glob("*.yaml"))
TORCH_OPTIMIZER = {"sgd": torch.optim.SGD, "sgd_heavy": torch.optim.SGD, "adamw": torch.optim.AdamW}


def test_every_group_option_is_covered():
    assert set(DATA) == {"folder", "nyud", "siftflow", "synthetic", "voc"}
    assert set(OPTIMIZERS) == set(TORCH_OPTIMIZER)
    assert len(SCHEDULERS) == 3 and len(ARCHS) == 4


@pytest.mark.parametrize("data", DATA)
def test_every_combination_composes_and_builds(data):
    # data needs no files here: the model's classes and channels come from the DataModule's
    # settings; tiny width keeps 36 models per data set cheap
    for optimizer, scheduler, arch in itertools.product(OPTIMIZERS, SCHEDULERS, ARCHS):
        combo = f"data={data} optimizer={optimizer} scheduler={scheduler} arch={arch}"
        cfg = cfg_of(
            "config",
            [
                f"data={data}",
                f"optimizer={optimizer}",
                f"scheduler={scheduler}",
                f"arch={arch}",
                "data.root=/nowhere",
                "arch.width=0.0625",
                "arch.pretrained=null",
                "+data.num_classes=3" if data == "folder" else "data.batch_size=1",
            ],
        )
        # the command-line choice wins, whole: no key of another optimizer leaks in
        assert cfg.optimizer.name == ("sgd" if optimizer == "sgd_heavy" else optimizer), combo
        assert cfg.scheduler.name == scheduler and cfg.arch.name == arch, combo
        check_settings(cfg)
        dm = make_datamodule(cfg.data)
        stage = stages_for(cfg)[-1]
        module = make_module(cfg, dm, stage, float(cfg.optimizer.lr), None)
        module.trainer = SimpleNamespace(estimated_stepping_batches=100)
        solver = module.configure_optimizers()
        opt = solver["optimizer"] if isinstance(solver, dict) else solver
        assert type(opt) is TORCH_OPTIMIZER[optimizer], combo
        assert opt.param_groups[0]["lr"] == pytest.approx(cfg.optimizer.lr), combo
        if scheduler != "fixed":
            assert isinstance(solver, dict) and "lr_scheduler" in solver, combo


def test_recipes_choose_groups_the_command_line_can_replace():
    assert cfg_of("config", ["data=voc", "data.root=/d"]).optimizer.momentum == 0.9
    heavy = cfg_of("config", ["data=nyud", "data.root=/d"])
    assert heavy.optimizer.lr == 1e-10 and heavy.optimizer.momentum == 0.99
    assert heavy.loss.reduction == "sum"
    mine = cfg_of("config", ["data=voc", "data.root=/d", "optimizer=adamw"])
    assert mine.optimizer.name == "adamw" and "momentum" not in mine.optimizer
    mine = cfg_of("config", ["experiment=voc_fcn8s_heavy", "data.root=/d", "optimizer=adamw"])
    assert mine.optimizer.name == "adamw" and "momentum" not in mine.optimizer
    # the paper's NYUDv2 recipe as the README gives it
    cfg = cfg_of("config", ["arch=fcn16s", "data=nyud", "data.root=/d"])
    assert stages_for(cfg) == ["fcn32s", "fcn16s"] and cfg.optimizer.name == "sgd"


def test_a_summed_loss_with_a_mean_loss_lr_warns(caplog):
    cfg = cfg_of("config", ["data=nyud", "data.root=/d", "optimizer=adamw"])
    with caplog.at_level("WARNING", logger="fcn_lightning"):
        check_settings(cfg)
    assert "loss.reduction=sum" in caplog.text and "loss.reduction=mean" in caplog.text
