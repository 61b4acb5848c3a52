"""The Hydra application: training runs, stages, checks, run folders, sweeps, callbacks, the console and the eval / predict / export commands (docs/ARCHITECTURE.md)."""
