"""Train an FCN: `python train.py` runs the quickstart (staged 32s -> 16s -> 8s on synthetic data);
docs/TRAINING.md has the rest."""

import sys

import hydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig

from fcn_lightning.app.console import route_third_party_logs
from fcn_lightning.app.stages import REPLACED, check_replaced
from fcn_lightning.app.sweeps import run_with_sweep_status, train_job
from fcn_lightning.errors import ConfigError


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    route_third_party_logs()  # Lightning's messages and warnings: the log file, filtered console
    return train_job(cfg)


def refuse_replaced_keys(args: list[str]) -> None:
    """A key the ``stages`` node replaced, on the command line, refused with its new spelling."""
    for arg in args:
        key = arg.split("=", 1)[0]
        if key.lstrip("+~").split(".")[0] not in REPLACED:
            continue
        try:
            (override,) = OverridesParser.create().parse_overrides([arg])
            value = None if override.is_sweep_override() else override.value()
            if value is not None and not isinstance(value, dict):
                value = arg.split("=", 1)[1]  # as typed: 1e-5, not 1e-05
        except HydraException:
            value = None  # the message then gives the spelling without the value
        try:
            check_replaced({key: value})
        except ConfigError as err:
            sys.exit(f"Error: {err}")


if __name__ == "__main__":
    refuse_replaced_keys(sys.argv[1:])
    run_with_sweep_status(main)
