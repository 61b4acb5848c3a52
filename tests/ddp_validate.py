"""Validate one fixed FCN on synthetic data with N CPU processes; print the metrics as JSON.

python tests/ddp_validate.py <devices> <out.json>
"""

import json
import sys

import pytorch_lightning as pl
import torch

from fcn_lightning.data import SyntheticDataModule
from fcn_lightning.module import FCNModule


def main() -> None:
    devices, out = int(sys.argv[1]), sys.argv[2]
    pl.seed_everything(0)
    module = FCNModule(
        {
            "arch": "fcn8s",
            "num_classes": 5,
            "width": 0.0625,
            "geometry": "same",
            "backbone": "vgg16_bn",
        }
    )
    with torch.no_grad():  # non-trivial predictions
        for p in module.model.heads.parameters():
            if p.requires_grad:
                p.normal_(std=0.5)
    # 7 images, 2 a batch: 4 batches in one process, 2 + 2 (2 + 1 images) in two
    data = SyntheticDataModule(image_size=32, train_size=4, val_size=7, val_batch_size=2)
    strategy = "ddp" if devices > 1 else "auto"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(module, data, verbose=False)
    if trainer.is_global_zero:
        with open(out, "w") as f:
            json.dump(module.results["val"]["out"], f)


if __name__ == "__main__":
    main()
