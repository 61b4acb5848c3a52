"""What the test modules share: the configs' folder, tiny run settings, composing a config, running a
command as a user would, and (``helpers.datasets``) small data sets in each official layout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
TINY = [
    "arch.width=0.0625",
    "data.image_size=32",
    "data.train_size=4",
    "data.val_size=2",
    "data.batch_size=4",
    "data.val_batch_size=2",
    "trainer.max_steps=1",
    "trainer.max_epochs=-1",
    "trainer.val_check_interval=null",
    "trainer.check_val_every_n_epoch=1",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
    "callbacks=none",
    "images.panel_size=1",
    "images.every_n_epochs=0",  # no figures: most of a tiny run's time; FIGURES where a test reads them
]
FIGURES = "images.every_n_epochs=1"
NO_DATA = [o for o in TINY if not o.startswith("data.")]


def cfg_of(name: str, overrides: list[str], out: Path | None = None):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    if out is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
    return cfg


def run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", HYDRA_FULL_ERROR="0")
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


SHARED_DATA = ROOT.parent / "shared" / "data"
RESUMABLE = [o for o in TINY if not o.startswith(("trainer.max_steps", "data.train_size"))] + [
    "arch=fcn32s", "data.train_size=16", "trainer.max_steps=8", "trainer.deterministic=true", "arch.dropout=0.5",
]  # fmt: skip

TINY_NOSYN = [*NO_DATA, "data.num_workers=0", "data.batch_size=2", "data.val_batch_size=2", "data.batching=pad",
              "arch.pretrained=null", "arch.geometry=same", "loss.reduction=mean", "optimizer.lr=1e-3"]  # fmt: skip


def final_state(out: Path, stage: str = "fcn32s") -> dict[str, torch.Tensor]:
    return torch.load(out / stage / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
