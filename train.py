"""Train an FCN: `python train.py` runs the embedded quickstart (staged 32s -> 16s -> 8s on
synthetic data); `python train.py arch=fcn16s data=voc data.root=/data/pascal` the paper's chain."""

import hydra
from omegaconf import DictConfig

from fcn_lightning.pipeline import train


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    return train(cfg)


if __name__ == "__main__":
    main()
