"""torchvision's FCN as a checkpoint of this project: its released weights or a state dict file.

``python -m fcn_lightning.app.torchvision_fcn fcn_resnet50 fcn_resnet50.ckpt`` writes one that
eval.py, predict.py, export.py and ``arch.init_from`` take like one written by train.py
(docs/TRUNKS.md, ResNet)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch

from ..atomic import write_atomically
from ..contract import DataContract
from ..data.voc import VOC_CLASSES
from ..errors import UserError
from ..models.torchvision_fcn import RELEASED, import_torchvision_fcn
from ..module import FCNModule

AUX_WEIGHT = 0.5  # torchvision's reference trains the auxiliary head with this loss weight


def torchvision_checkpoint(source: object, path: str | Path, *, progress: bool = True) -> Path:
    """Write ``source`` (a name of :data:`RELEASED`, a state dict or its file) as a checkpoint
    of an ``fcn_torchvision`` FCNModule at ``path`` (a new file): the 21 VOC classes' names where
    it predicts 21 (torchvision's released FCNs), ImageNet normalisation, the weights unchanged."""
    path = Path(path).expanduser()
    if path.suffix != ".ckpt" or path.is_dir():
        raise UserError(f"{path}: name a checkpoint file ending in .ckpt, e.g. fcn_resnet50.ckpt")
    if path.exists():
        raise UserError(f"{path} exists: nothing is written over it; name another file")
    if not path.parent.is_dir():
        raise UserError(f"{path.parent} is not a folder: make it first, or write elsewhere")
    net = import_torchvision_fcn(source, progress=progress)
    spec = net.spec
    classes = spec.heads[0][1]  # the VOC classes' names where there are 21 (the released ones)
    model = {"arch": spec.arch, "backbone": spec.backbone, "geometry": spec.geometry,
             "width": spec.width, "pretrained": None, "learnable_upsampling": True, "dropout": 0.0,
             "normalization": "imagenet", "output_stride": spec.output_stride,
             "aux_weight": AUX_WEIGHT if spec.aux else 0.0}  # fmt: skip
    names = VOC_CLASSES if classes == len(VOC_CLASSES) else classes  # else numbered: 0, 1, ...
    module = FCNModule(model, contract=DataContract.for_classes({"out": names}))
    module.model.load_state_dict(net.state_dict())
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": pl.__version__, "imported_from": str(source)}  # fmt: skip
    write_atomically(path, lambda f: torch.save(ckpt, f))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fcn_lightning.app.torchvision_fcn", description=__doc__.splitlines()[0]
    )
    parser.add_argument("source", help=f"{' | '.join(RELEASED)} (downloaded through torchvision, "
                        "or read from its cache) or a state dict file of one")  # fmt: skip
    parser.add_argument("out", help="the checkpoint to write, e.g. fcn_resnet50.ckpt")
    args = parser.parse_args(argv)
    try:
        path = torchvision_checkpoint(args.source, args.out)
    except (UserError, ValueError, FileNotFoundError) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path}; score it on VOC2012 val with\n  python eval.py ckpt_path={path} data=voc "
          "data.root=/data/pascal data.year=2012 data.val_split=val")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
