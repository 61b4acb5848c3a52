"""The project's benchmarks, each printing figures (docs/PERFORMANCE.md); ``main``: speed.py's."""

from .speed import main

__all__ = ["main"]
