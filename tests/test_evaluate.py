"""eval.py scores a checkpoint on the data it was trained with (the checkpoint's record of
train.py's data settings) and says so; data.<key>=... changes one of those settings, data=...
takes other data whole, and a checkpoint without the record says to pass data=."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import CONF, NO_DATA, cfg_of, run
from helpers.datasets import write_folder
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from fcn_lightning.app.evaluate import evaluate
from fcn_lightning.app.train import train
from fcn_lightning.errors import ConfigError

CLASSES = ["background", "blob", "bar", "dot", "ring"]  # the synthetic data's, for data=synthetic
SPLITS = {"train": ["a", "b", "c", "d"], "val": ["e", "f"], "test": ["g", "h"]}
FOLDER = "fcn_lightning.data.FolderDataModule"
SYNTHETIC = ["data.image_size=32", "data.val_size=2"]  # for data=synthetic: tiny
AS_TRAINED = "— pass data=... to evaluate on other data"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny FCN-32s trained on a folder dataset: (data root, run folder)."""
    tmp = tmp_path_factory.mktemp("own")
    root = write_folder(tmp / "mine", [i for ids in SPLITS.values() for i in ids], CLASSES, SPLITS)
    args = [*NO_DATA, "arch=fcn32s", "data=folder", f"data.root={root}", "data.batching=pad",
            "data.batch_size=2", "data.val_batch_size=2", "data.num_workers=0",
            "data.scale_range=null", "arch.pretrained=null", "arch.backbone=vgg16_bn",
            "optimizer=adamw_scratch", "trainer.max_steps=2"]  # fmt: skip
    train(cfg_of("config", args, tmp / "run"))
    return root, tmp / "run"


@pytest.fixture
def eval_cfg():
    """eval.py's config as its Hydra run composes it, the command line in HydraConfig."""

    def compose_eval(args: list[str], out):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("eval", overrides=args, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
            cfg.paths.output_dir = str(out)
        return cfg

    yield compose_eval
    HydraConfig.instance().cfg = None


def best(run_dir):
    return run_dir / "fcn32s" / "checkpoints" / "best.ckpt"


def test_eval_without_data_scores_the_data_it_was_trained_on(trained, eval_cfg, tmp_path, capsys):
    root, run_dir = trained
    record = torch.load(best(run_dir), weights_only=True)["data"]  # plain values
    assert record["_target_"] == FOLDER and record["root"] == str(root)
    report = evaluate(eval_cfg([f"ckpt_path={best(run_dir)}", "trainer.accelerator=cpu"], tmp_path))
    said = capsys.readouterr().out
    assert f"data: as trained ({FOLDER}, root {root}, split val) {AS_TRAINED}" in said
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert (saved["data_root"], saved["split"]) == (str(root), "val")
    assert saved["data"]["from"] == "checkpoint" and saved["data"]["command_line"] == []
    assert saved["data"]["settings"]["class_names"] == record["class_names"]
    trained_metrics = json.loads((run_dir / "metrics.json").read_text())["fcn32s"]
    for name in ("mIoU", "pixel_acc", "mean_acc", "fwIoU"):
        assert saved["metrics"][name] == pytest.approx(trained_metrics[name], abs=1e-6), name


def test_a_data_key_on_the_command_line_changes_that_key_alone(trained, eval_cfg, tmp_path, capsys):
    root, run_dir = trained
    ckpt = [f"ckpt_path={best(run_dir)}", "trainer.accelerator=cpu"]
    report = evaluate(eval_cfg([*ckpt, "data.split=test"], tmp_path / "test"))
    said = capsys.readouterr().out
    assert f"as trained with data.split=test ({FOLDER}, root {root}, split test)" in said
    assert (report["data_root"], report["split"]) == (str(root), "test")
    assert report["data"]["command_line"] == ["data.split=test"]
    assert report["data"]["settings"]["val_split"] == "val"  # the rest as recorded
    moved = shutil.copytree(root, tmp_path / "moved")
    report = evaluate(eval_cfg([*ckpt, f"data.root={moved}"], tmp_path / "moved_eval"))
    assert (report["data_root"], report["split"]) == (str(moved), "val")
    assert report["data"]["settings"]["_target_"] == FOLDER
    with pytest.raises(ConfigError, match=r"data.root .*nowhere, which is not on this machine"):
        evaluate(eval_cfg([*ckpt, "data.root=/nowhere"], tmp_path / "nowhere"))


def test_data_on_the_command_line_takes_other_data_whole(trained, eval_cfg, tmp_path, capsys):
    _, run_dir = trained
    args = [f"ckpt_path={best(run_dir)}", "trainer.accelerator=cpu", "data=synthetic", *SYNTHETIC]
    report = evaluate(eval_cfg(args, tmp_path))
    assert "data: as given (fcn_lightning.data.SyntheticDataModule, split val)" in (
        capsys.readouterr().out
    )
    assert report["data_root"] is None and report["data"]["from"] == "given"
    assert report["data"]["settings"]["image_size"] == 32


def test_a_checkpoint_without_its_data_says_to_pass_data(trained, eval_cfg, tmp_path, capsys):
    _, run_dir = trained
    older = torch.load(best(run_dir), weights_only=True)
    del older["data"]  # as written before checkpoints kept their data settings
    torch.save(older, tmp_path / "older.ckpt")
    args = [f"ckpt_path={tmp_path / 'older.ckpt'}", "trainer.accelerator=cpu", *SYNTHETIC]
    report = evaluate(eval_cfg(args, tmp_path / "eval"))
    said = capsys.readouterr().out
    assert "does not record the data it was trained on" in said
    assert "pass data=<name> data.root=... to evaluate on that data" in said
    assert report["data"]["from"] == "default"
    assert report["data"]["settings"]["_target_"] == "fcn_lightning.data.SyntheticDataModule"


def test_eval_py_without_data_says_it_scores_the_training_data(trained, tmp_path):
    root, run_dir = trained
    done = run("eval.py", f"ckpt_path={best(run_dir)}", "trainer.accelerator=cpu",
               f"output={tmp_path}", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"data: as trained ({FOLDER}, root {root}, split val) {AS_TRAINED}" in done.stdout
    assert json.loads((tmp_path / "eval.json").read_text())["data"]["from"] == "checkpoint"
