"""The benchmarks run (quick CPU mode, small sizes), so they never rot; they measure nothing here."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from fcn_lightning import bench  # light: each benchmark module imports what it measures

ROOT = Path(__file__).resolve().parents[1]


def test_speed_benchmark_quick_mode_prints_every_row(capsys, recwarn):
    rows = bench.main(["--quick"])
    lightning = [str(w.message) for w in recwarn if "validation_step" in str(w.message)]
    assert not lightning, lightning  # the Lightning loop row gives its module a (skipped) loader
    names = [r["row"].split()[0] for r in rows]
    assert names == ["a", "b1", "b2", "b3", "c", "d", "d"]
    for r in rows:
        assert r["ms"] > 0 and r["tflops"] > 0 and math.isfinite(r["ceiling_share"])
    out = capsys.readouterr().out
    assert "device: CPU" in out and "matmul ceiling" in out and "x (a)" in out


def test_model_cost_and_data_loader_benchmarks_run(capsys):
    from fcn_lightning.bench import data_loader, model_cost

    model_cost.main(["--size", "64", "64"])
    out = capsys.readouterr().out
    assert "fcn8s_atonce" in out and "GFLOP" in out
    threads = torch.get_num_threads()
    data_loader.main(["--images", "4", "--repeat", "1"])
    assert torch.get_num_threads() == threads  # its one-thread setting does not leak
    out = capsys.readouterr().out
    assert "img/s" in out and "decode + check + train transforms" in out


def test_label_check_benchmark_runs_on_a_small_corpus(capsys, tmp_path):
    from fcn_lightning.bench import label_check

    before = os.environ.get("FCN_LIGHTNING_CACHE")
    label_check.main(["--n", "40", "--workers", "1", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert "40 label files" in out and "written in" in out and "cached check" in out
    label_check.main(["--n", "40", "--workers", "1", "--root", str(tmp_path)])
    assert f"reused from {tmp_path}" in capsys.readouterr().out
    assert os.environ.get("FCN_LIGHTNING_CACHE") == before  # its cold cache does not leak


def test_benchmarks_run_with_python_dash_m():
    done = subprocess.run(
        [sys.executable, "-m", "fcn_lightning.bench.model_cost", "--size", "32", "32"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "fcn32s" in done.stdout and "GFLOP" in done.stdout
