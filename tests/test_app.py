"""The Hydra application: configs compose, train / eval / predict run, sweeps, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import CONF, NO_DATA, TINY, cfg_of
from helpers.launcher import cli
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from fcn_lightning.app.checks import check_settings
from fcn_lightning.app.evaluate import evaluate
from fcn_lightning.app.predict import predict
from fcn_lightning.app.stages import stages_for
from fcn_lightning.app.train import train
from fcn_lightning.models import ARCHS

# --------------------------------------------------------------------------- composition
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_composes(experiment):
    cfg = cfg_of("config", [f"experiment={experiment}", "data.root=/data"])
    assert cfg.arch.name in ARCHS
    assert cfg.optimizer.lr > 0 and cfg.data._target_.startswith("fcn_lightning.data.")
    check_settings(cfg)  # and passes the checks a run makes first (each stage's net built)


def test_heavy_preset_has_the_reference_solver():
    cfg = cfg_of("config", ["experiment=voc_fcn8s_heavy", "data.root=/data"])
    assert (
        cfg.loss.reduction == "sum" and cfg.optimizer.lr == 1e-10 and cfg.optimizer.momentum == 0.99
    )
    assert (
        cfg.data.batch_size == 1
        and cfg.stages.fcn16s.lr_factor == cfg.stages.fcn8s.lr_factor == 0.01
        and cfg.data.val_split == "seg11valid"
    )
    assert stages_for(cfg) == ["fcn32s", "fcn16s", "fcn8s"]


def test_default_is_the_quickstart_and_user_choices_win():
    cfg = cfg_of("config", [])
    assert cfg.data._target_.endswith("SyntheticDataModule") and cfg.optimizer.name == "adamw"
    assert stages_for(cfg) == ["fcn32s", "fcn16s", "fcn8s"]
    cfg = cfg_of("config", ["optimizer=sgd", "arch.width=0.5"])
    assert cfg.optimizer.name == "sgd" and "betas" not in cfg.optimizer and cfg.arch.width == 0.5
    cfg = cfg_of("config", ["data=voc", "data.root=/data"])
    assert (
        cfg.optimizer.name == "sgd" and cfg.arch.width == 1.0 and cfg.arch.pretrained == "imagenet"
    )
    assert stages_for(cfg_of("config", ["staged=false"])) == ["fcn8s"]
    assert stages_for(cfg_of("config", ["arch=fcn16s"])) == ["fcn32s", "fcn16s"]
    assert stages_for(cfg_of("config", ["arch.init_from=/x.ckpt"])) == ["fcn8s"]


@pytest.mark.parametrize(
    "group",
    [
        "trainer=cpu",
        "trainer=gpu",
        "trainer=ddp",
        "debug=fdr",
        "debug=overfit",
        "debug=limit",
        "scheduler=poly",
        "scheduler=cosine",
        "data=folder",
    ],
)
def test_group_options_compose(group):
    cfg = cfg_of("config", [group, "data.root=/data"])
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"


def test_optuna_search_composes():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["hparams_search=optuna"], return_hydra_config=True)
    assert cfg.hydra.sweeper.direction == "maximize" and "optimizer.lr" in cfg.hydra.sweeper.params


# --------------------------------------------------------------------------- train / eval / predict
@pytest.fixture(scope="module")
def trained(tiny_run):
    return tiny_run


def test_train_writes_run_folder(trained):
    out, score = trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["fcn32s", "fcn16s"]
    for block in metrics.values():
        assert {"mIoU", "pixel_acc", "mean_acc", "fwIoU", "per_class_IoU"} <= set(block)
        assert set(block["per_class_IoU"]) == {"background", "blob", "bar", "dot", "ring"}
    assert score == pytest.approx(metrics["fcn16s"]["mIoU"])
    for stage in ("fcn32s", "fcn16s"):
        assert (out / stage / "checkpoints" / "best.ckpt").is_file()
        assert (out / stage / "checkpoints" / "last.ckpt").is_file()
        assert list((out / "tensorboard" / stage).glob("events.out.tfevents.*"))
    # the HParams tab: the module's settings and the run's (what a sweep over data.* varies)
    events = EventAccumulator(str(out / "tensorboard" / "fcn16s"), size_guidance={"tensors": 0})
    events.Reload()
    content = events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    shown = set(plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams)
    assert {"optimizer/lr", "model/arch", "run/seed", "run/data/batch_size"} <= shown


def test_resume_skips_finished_stages(trained, caplog):
    out, _ = trained
    best = out / "fcn32s" / "checkpoints" / "best.ckpt"
    before = best.stat().st_mtime_ns
    metrics_before = json.loads((out / "metrics.json").read_text())
    cfg = cfg_of("config", ["arch=fcn16s", "resume=true", *TINY], out)
    with caplog.at_level("INFO", logger="fcn_lightning"):
        train(cfg)
    assert best.stat().st_mtime_ns == before
    assert (
        "fcn32s: finished before, skipped" in caplog.text
        and "fcn16s: finished before, skipped" in caplog.text
    )
    assert json.loads((out / "metrics.json").read_text()) == metrics_before


def test_init_from_starts_the_named_stage_from_a_checkpoint(trained, tmp_path):
    out, _ = trained
    cfg = cfg_of(
        "config",
        ["arch=fcn8s", f"arch.init_from={out / 'fcn16s/checkpoints/best.ckpt'}", *TINY],
        tmp_path,
    )
    train(cfg)
    assert list(json.loads((tmp_path / "metrics.json").read_text())) == ["fcn8s"]
    with pytest.raises(ValueError, match="arch.init_from: checkpoint not found"):
        train(cfg_of("config", ["arch.init_from=/nope.ckpt", *TINY], tmp_path / "x"))


def test_eval_prints_and_writes_metrics(trained, tmp_path, capsys):
    out, _ = trained
    ckpt = out / "fcn16s" / "checkpoints" / "best.ckpt"
    cfg = cfg_of(
        "eval",
        [
            f"ckpt_path={ckpt}",
            "data.image_size=32",
            "data.val_size=2",
            "data.split=val",
            "trainer.accelerator=cpu",
        ],
        tmp_path,
    )
    report = evaluate(cfg)
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "IoU per class" in printed and "ring" in printed
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["split"] == "val" and saved["metrics"]["mIoU"] == pytest.approx(
        report["metrics"]["mIoU"]
    )
    # the same checkpoint and data give the numbers training recorded
    trained_metrics = json.loads((out / "metrics.json").read_text())["fcn16s"]
    assert saved["metrics"]["mIoU"] == pytest.approx(trained_metrics["mIoU"], abs=1e-6)


def test_eval_refuses_data_with_other_classes(trained, tmp_path):
    out, _ = trained
    from helpers.datasets import write_folder

    write_folder(tmp_path / "d", ["a"], ["bg", "fg"], splits={"val": ["a"]})
    cfg = cfg_of(
        "eval",
        [
            f"ckpt_path={out / 'fcn16s/checkpoints/best.ckpt'}",
            "data=folder",
            f"data.root={tmp_path / 'd'}",
        ],
        tmp_path,
    )
    with pytest.raises(ValueError, match=r"predicts \{'out': 5\} classes but .* has \{'out': 2\}"):
        evaluate(cfg)


def test_predict_writes_label_and_overlay_at_each_size(trained, tmp_path):
    out, _ = trained
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.jpg", (37, 50)), ("b.png", (20, 16))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(images / name)
    cfg = cfg_of(
        "predict",
        [
            f"ckpt_path={out / 'fcn16s/checkpoints/best.ckpt'}",
            f"input={images}",
            f"output={tmp_path / 'pred'}",
            "device=cpu",
        ],
    )
    written = predict(cfg)
    assert sorted(p.name for p in written) == ["a.png", "b.png"]
    label = Image.open(tmp_path / "pred" / "a.png")
    assert label.mode == "P" and label.size == (50, 37)
    assert np.asarray(label).max() < 5
    assert Image.open(tmp_path / "pred" / "b_overlay.jpg").size == (16, 20)
    cfg = cfg_of(
        "predict",
        [
            f"ckpt_path={out / 'fcn16s/checkpoints/best.ckpt'}",
            f"input={tmp_path / 'none'}",
            f"output={tmp_path}",
        ],
    )
    with pytest.raises(ValueError, match="input not found"):
        predict(cfg)


def test_missing_data_root_names_the_setting(tmp_path):
    with pytest.raises(Exception, match="data.root"):
        train(cfg_of("config", ["data=voc", *NO_DATA], tmp_path))


def test_missing_dataset_fails_before_training(tmp_path):
    cfg = cfg_of("config", ["data=voc", f"data.root={tmp_path / 'nowhere'}", *NO_DATA], tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        train(cfg)
    assert not (tmp_path / "fcn32s").exists()


# --------------------------------------------------------------------------- subprocesses
# each train.py command a process of its own, forked from helpers.launcher's server (which has
# imported what train.py imports: seconds a command need not pay again)
def test_cli_staged_chain_transfers_best_checkpoint(tmp_path):
    # fcn16s trains 0 steps: its checkpoint holds exactly the weights it started from
    result = cli(
        "arch=fcn16s",
        *TINY,
        "trainer.max_steps=-1",  # each stage its own budget: fcn32s 1 step, fcn16s none
        "stages.fcn32s.max_steps=1",
        "stages.fcn16s.max_steps=0",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fcn32s" in result.stdout and "fcn16s" in result.stdout and "mIoU" in result.stdout
    s32 = torch.load(tmp_path / "fcn32s/checkpoints/best.ckpt", weights_only=True)["state_dict"]
    s16 = torch.load(tmp_path / "fcn16s/checkpoints/best.ckpt", weights_only=True)["state_dict"]
    shared = [k for k in s16 if k in s32 and k != "model._extra_state"]
    assert len(shared) > 20 and any("score_fr" in k for k in shared)
    for k in shared:
        assert torch.equal(s16[k], s32[k]), k
    assert s16["model.heads.out.score_pool4.weight"].abs().sum() == 0
    assert (tmp_path / ".hydra" / "config.yaml").is_file()


def test_cli_multirun_writes_job_folders_and_summary(tmp_path):
    result = cli(
        "-m",
        "arch=fcn32s",
        "optimizer.lr=1e-3,1e-4",
        *TINY,
        f"hydra.sweep.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = ["0_optimizer.lr=0.001", "1_optimizer.lr=0.0001"]  # named by what the sweep varies
    assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == jobs
    for job in jobs:
        assert (tmp_path / job / "metrics.json").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [j["job"] for j in summary] == ["0", "1"]
    assert "optimizer.lr=0.001" in summary[0]["overrides"] and "fcn32s" in summary[1]["metrics"]
    assert (tmp_path / "summary.txt").is_file()


def test_cli_optuna_search_runs_trials(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    result = cli(
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "arch=fcn32s",
        *TINY,
        f"hydra.sweep.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Best value" in result.stdout + result.stderr
    best = (tmp_path / "optimization_results.yaml").read_text()
    assert "optimizer.lr" in best
    assert len(json.loads((tmp_path / "summary.json").read_text())) == 2


@pytest.mark.parametrize(
    "override,message",
    [
        ("arch=fcn64s", "Could not find 'arch/fcn64s'"),
        ("optimizer.lrr=1", "Could not override 'optimizer.lrr'"),
    ],
)
def test_cli_config_mistakes_give_hydra_errors(tmp_path, override, message):
    result = cli(override, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
