"""Export a checkpoint's network for deployment: `python export.py ckpt_path=... format=onnx|
exported_program output=<file>` writes the model (verified against the checkpoint at two input
sizes before it gets its name) and <output>.json, the metadata a deployer needs."""

import hydra
from omegaconf import DictConfig

from fcn_lightning.app.common import as_command
from fcn_lightning.app.console import route_third_party_logs
from fcn_lightning.app.export import export


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    route_third_party_logs()  # Lightning's messages and warnings: the log file, filtered console
    as_command(export, cfg)


if __name__ == "__main__":
    main()
