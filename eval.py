"""Evaluate a checkpoint: `python eval.py ckpt_path=... data=voc data.root=... [data.split=...]`
prints mean IoU, pixel accuracy, mean accuracy, f.w. IoU and IoU per class, and writes eval.json."""

import hydra
from omegaconf import DictConfig

from fcn_lightning.app.common import as_command
from fcn_lightning.app.console import route_third_party_logs
from fcn_lightning.app.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    route_third_party_logs()  # Lightning's messages and warnings: the log file, filtered console
    as_command(evaluate, cfg)


if __name__ == "__main__":
    main()
