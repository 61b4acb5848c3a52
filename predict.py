"""Predict: `python predict.py ckpt_path=... input=<image or folder> output=<folder>` writes a
palette label PNG and a colour overlay per image, at the image's own size."""

import hydra
from omegaconf import DictConfig

from fcn_lightning.app.common import as_command
from fcn_lightning.app.console import route_third_party_logs
from fcn_lightning.app.predict import predict


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    route_third_party_logs()  # Lightning's messages and warnings: the log file, filtered console
    as_command(predict, cfg)


if __name__ == "__main__":
    main()
