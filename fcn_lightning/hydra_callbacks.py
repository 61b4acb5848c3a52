"""Hydra callback: a summary of every job's final metrics at the root of a multirun sweep."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("fcn_lightning")


class SweepSummary(Callback):
    """Writes ``<sweep dir>/summary.json`` and ``summary.txt``: each job's overrides and the
    val metrics of its stages (read from the job's ``metrics.json``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir)
        jobs = []
        for metrics_file in sorted(
            root.glob("*/metrics.json"), key=lambda p: (len(p.parent.name), p.parent.name)
        ):
            overrides_file = metrics_file.parent / ".hydra" / "overrides.yaml"
            overrides = (
                [
                    line[2:].strip()
                    for line in overrides_file.read_text().splitlines()
                    if line.startswith("- ")
                ]
                if overrides_file.is_file()
                else []
            )
            jobs.append(
                {
                    "job": metrics_file.parent.name,
                    "overrides": overrides,
                    "metrics": json.loads(metrics_file.read_text()),
                }
            )
        if not jobs:
            log.warning("sweep summary: no job under %s wrote metrics.json", root)
            return
        (root / "summary.json").write_text(json.dumps(jobs, indent=2) + "\n")
        # show only the overrides that differ between jobs: what the sweep varied
        common = set.intersection(*(set(j["overrides"]) for j in jobs)) if len(jobs) > 1 else set()
        lines = [f"{'job':<5}{'stage':<14}{'mIoU %':>8}{'pix acc':>9}  swept settings"]
        for job in jobs:
            varied = [o for o in job["overrides"] if o not in common]
            for stage, block in job["metrics"].items():
                m = block if "mIoU" in block else next(iter(block.values()))
                lines.append(
                    f"{job['job']:<5}{stage:<14}{100 * m['mIoU']:>8.1f}{100 * m['pixel_acc']:>9.1f}  {' '.join(varied)}"
                )
        (root / "summary.txt").write_text("\n".join(lines) + "\n")
        print(f"\nSweep summary ({root / 'summary.txt'}):\n" + "\n".join(lines))
