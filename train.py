"""Train an FCN: `python train.py` runs the embedded quickstart (staged 32s -> 16s -> 8s on
synthetic data); `python train.py arch=fcn16s data=voc data.root=/data/pascal` the paper's chain.
In a sweep (`-m`) a failed job is recorded and the sweep goes on (fcn_lightning/sweeps.py)."""

import hydra
from omegaconf import DictConfig

from fcn_lightning.app.console import route_third_party_logs
from fcn_lightning.app.sweeps import run_with_sweep_status, train_job


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    route_third_party_logs()  # Lightning's messages and warnings: the log file, filtered console
    return train_job(cfg)


if __name__ == "__main__":
    run_with_sweep_status(main)
