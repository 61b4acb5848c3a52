"""``python -m fcn_lightning.bench``: the speed benchmark (speed.py)."""

from .speed import main

main()
