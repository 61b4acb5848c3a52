"""TensorBoard as users open it: a real ``tensorboard`` server on finished tiny runs, read back
through its HTTP API (the calls its web page makes), every value against the run's own files
(metrics.json, run.json, the checkpoints).

Two runs, each trained once: the default staged FCN-32s -> 16s -> 8s on the synthetic data (one
TensorBoard run per stage, side by side) and a two-headed FCN-16s on a tiny SIFT Flow (``sem``
and ``geo``: curves, panels, confusion matrices and HParams metrics per head).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import FIGURES, NO_DATA, TINY, cfg_of
from helpers.datasets import write_siftflow
from helpers.tensorboard import Board, serve

from fcn_lightning.app.board import SHOWN
from fcn_lightning.app.train import train
from fcn_lightning.contract import METRIC_NAMES
from fcn_lightning.module import load_checkpoint
from fcn_lightning.reports import tag

pytestmark = pytest.mark.xdist_group("tensorboard_runs")  # one worker trains the module's runs once

# the callbacks and figures users get (the learning-rate monitor among them), not TINY's none
USERS = ["callbacks=default", FIGURES]
STAGED = [*TINY, *USERS]
SIFT = [
    *NO_DATA,
    *USERS,
    "arch=fcn16s",
    "data=siftflow",
    "data.num_workers=0",
    "data.batch_size=2",
    "data.val_batch_size=2",
    "data.batching=pad",
    "arch.pretrained=null",
    "arch.geometry=same",
    "loss.reduction=mean",
    "optimizer.lr=1e-3",
]


# --------------------------------------------------------------------------- the runs
class Run:
    """A finished run folder and what its own files say."""

    def __init__(self, out: Path, stages: list[str]) -> None:
        self.out, self.stages = out, stages
        self.metrics = json.loads((out / "metrics.json").read_text())
        self.plans = json.loads((out / "run.json").read_text())["stages"]
        block = self.metrics[stages[0]]
        self.single = "mIoU" in block
        self.heads = ["out"] if self.single else list(block)
        self.board: Board | None = None

    def run_name(self, stage: str) -> str:  # the TensorBoard run of a stage
        return f"tensorboard/{stage}"

    def results(self, stage: str, head: str) -> dict:
        return self.metrics[stage] if self.single else self.metrics[stage][head]

    def tag(self, split: str, head: str, name: str) -> str:
        return tag(split, head, name, self.single)


@pytest.fixture(scope="module", params=["staged", "two_heads"])
def run(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(request.param)
    out = base / "run"
    if request.param == "staged":
        train(cfg_of("config", STAGED, out))
        stages = ["fcn32s", "fcn16s", "fcn8s"]
    else:
        sift = write_siftflow(
            base / "sift", train=["coast_a1", "street_b2"], test=["coast_t1", "highway_t2"]
        )
        train(cfg_of("config", [*SIFT, f"data.root={sift}"], out))
        stages = ["fcn32s", "fcn16s"]
    result = Run(out, stages)
    assert list(result.metrics) == stages
    assert result.heads == (["out"] if request.param == "staged" else ["sem", "geo"])
    with serve(out, base / "tensorboard.log") as board:  # stopped at the module's end
        result.board = board
        yield result


def close(a: float, b: float) -> bool:
    """Equal up to float32, as TensorBoard stores scalars."""
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)


# --------------------------------------------------------------------------- checks
def test_every_stage_is_a_run_side_by_side(run):
    # one logdir, one TensorBoard run per stage, listed in the order they were trained
    assert run.board.get("/data/runs") == [run.run_name(s) for s in run.stages]


def test_curves_are_the_runs_own_metrics(run):
    tags = run.board.get("/data/plugin/scalars/tags")
    assert set(tags) == {run.run_name(s) for s in run.stages}
    for stage in run.stages:
        name = run.run_name(stage)
        shown = set(tags[name])
        expected = {"val/loss"}
        for head in run.heads:
            results = run.results(stage, head)
            expected |= {run.tag("val", head, k) for k in METRIC_NAMES}
            present = {c: v for c, v in results["per_class_IoU"].items() if v is not None}
            expected |= {run.tag("val", head, f"IoU/{c}") for c in present}
            for key in METRIC_NAMES:
                (*_, (_, value)) = run.board.scalars(name, run.tag("val", head, key))
                assert close(value, results[key]), (stage, head, key, value, results[key])
            for cls, iou in present.items():
                (*_, (_, value)) = run.board.scalars(name, run.tag("val", head, f"IoU/{cls}"))
                assert close(value, iou), (stage, head, cls)
        # every val/ curve once, under the one name the contract gives it: none doubled
        # (val/mIoU beside val/out/mIoU, a *_epoch twin), none missing
        assert {t for t in shown if t.startswith("val/")} == expected, (stage, sorted(shown))
        assert not [t for t in shown if t.endswith(("_epoch", "_step"))]
        # the training loss, every step (TINY: one step per stage, log_every_n_steps=1)
        loss = run.board.scalars(name, "train/loss")
        assert [s for s, _ in loss] == [0] and all(math.isfinite(v) for _, v in loss)
        # the learning rates (LearningRateMonitor: weights and biases), the stage's planned lr
        rates = sorted(t for t in shown if t.startswith("lr-") and t.endswith("/weights"))
        assert len(rates) == 1, sorted(shown)
        (*_, (_, lr)) = run.board.scalars(name, rates[0])
        assert close(lr, run.plans[stage]["lr"]), (stage, lr, run.plans[stage])
        assert rates[0].replace("/weights", "/biases") in shown


def test_panels_and_confusion_matrices_per_head(run):
    # labelled figures (tests/test_board.py checks their contents before rendering); here: what
    # the server serves, per stage and head, at a readable size, in the labels' exact colours
    tags = run.board.get("/data/plugin/images/tags")
    assert set(tags) == {run.run_name(s) for s in run.stages}
    for stage in run.stages:
        name = run.run_name(stage)
        kinds = ("predictions", "confusion_matrix", "per_class_IoU")
        expected = {run.tag("val", h, kind) for h in run.heads for kind in kinds}
        assert set(tags[name]) == expected, (stage, sorted(tags[name]))
        contract = load_checkpoint(run.out / stage / "checkpoints" / "best.ckpt").contract
        for head in run.heads:
            n = len(run.results(stage, head)["per_class_IoU"])
            assert len(contract.class_names(head)) == n
            panel = run.board.last_image(name, run.tag("val", head, "predictions"))
            assert panel.size[0] >= 400 and panel.size[1] >= 200, (stage, head, panel.size)
            pixels = {tuple(c) for c in np.asarray(panel.convert("RGB")).reshape(-1, 3).tolist()}
            palette = {tuple(c) for c in contract.heads[head].palette[:n]}
            assert pixels & palette, (stage, head)  # label images and legend swatches, unblended
            confusion = run.board.last_image(name, run.tag("val", head, "confusion_matrix"))
            assert min(confusion.size) >= 15 * n, (stage, head, confusion.size)  # a name per row
            png = "confusion_matrix" + (f"_{head}" if len(run.heads) > 1 else "")
            assert (run.out / stage / "figures" / f"{png}.png").is_file()


def test_hparams_table_lists_every_stage_with_its_metrics(run):
    metric_tags = {run.tag("hp", h, k) for h in run.heads for k in METRIC_NAMES}
    experiment = run.board.experiment()
    assert {m["name"]["tag"] for m in experiment["metricInfos"]} == metric_tags
    columns = {h["name"] for h in experiment["hparamInfos"]}
    assert {"model/arch", "optimizer/lr", "model/width", "run/seed"} <= columns
    # the table opens on the columns that tell the stages (and sweep points) apart
    shown = [h["name"] for h in experiment["hparamInfos"] if h.get("differs")]
    # the five TensorBoard shows (it shows five of those marked, no more), arch and lr among them
    assert set(shown) == set(SHOWN[:5]) and {"model/arch", "optimizer/lr"} <= set(shown), shown
    infos = [h["name"] for h in experiment["hparamInfos"]]
    assert set(infos[: len(shown)]) == set(shown)  # listed first (the server sorts them by name)
    groups = {g["name"]: g for g in run.board.session_groups()}
    assert set(groups) == {run.run_name(s) for s in run.stages}
    for stage in run.stages:
        group = groups[run.run_name(stage)]
        hparams = group["hparams"]
        assert hparams["model/arch"] == stage
        assert close(hparams["optimizer/lr"], run.plans[stage]["lr"])
        assert hparams["model/width"] == 0.0625 and hparams["run/seed"] == 1337
        values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert set(values) == metric_tags, (stage, sorted(values))
        for head in run.heads:
            results = run.results(stage, head)
            for key in METRIC_NAMES:
                value = values[run.tag("hp", head, key)]
                assert close(value, results[key]), (stage, head, key, value, results[key])


def test_each_validation_is_one_point_of_each_curve(run):
    for stage in run.stages:
        name = run.run_name(stage)
        head = run.heads[0]
        validations = len(run.board.scalars(name, run.tag("val", head, "mIoU")))
        assert len(run.board.scalars(name, "val/loss")) == validations, stage
