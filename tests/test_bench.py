"""The benchmarks run (quick CPU mode), so they never rot; they measure nothing here."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

from fcn_lightning import bench

ROOT = Path(__file__).resolve().parents[1]


def test_speed_benchmark_quick_mode_prints_every_row(capsys):
    rows = bench.main(["--quick"])
    names = [r["row"].split()[0] for r in rows]
    assert names == ["a", "b1", "b2", "b3", "c", "d", "d"]
    for r in rows:
        assert r["ms"] > 0 and r["tflops"] > 0 and math.isfinite(r["ceiling_share"])
    out = capsys.readouterr().out
    assert "device: CPU" in out and "matmul ceiling" in out and "x (a)" in out


def test_model_cost_and_data_loader_benchmarks_run(tmp_path):
    cost = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/model_cost.py"), "--size", "64", "64"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cost.returncode == 0, cost.stderr
    assert "fcn8s_atonce" in cost.stdout and "GFLOP" in cost.stdout
    loader = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/data_loader.py"), "--images", "4", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loader.returncode == 0, loader.stderr
    assert "img/s" in loader.stdout
