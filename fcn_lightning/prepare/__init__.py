"""Putting a dataset on disk in the layout its DataModule reads: ``python -m fcn_lightning.prepare`` (docs/DATA.md)."""
