"""The project's benchmarks. Each prints figures (none is a timed test); docs/PERFORMANCE.md
holds what they measured.

    python -m fcn_lightning.bench [--quick]          # training and inference speed (speed.py)
    python -m fcn_lightning.bench.model_cost         # parameters and FLOPs per arch, geometry
    python -m fcn_lightning.bench.data_loader        # img/s of one loader worker
    python -m fcn_lightning.bench.label_check        # the label check, first and cached

``main`` is the speed benchmark's.
"""

from .speed import main

__all__ = ["main"]
