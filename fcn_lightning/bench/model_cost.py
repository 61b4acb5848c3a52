"""Model cost: parameters and forward FLOPs of every arch in both geometries (default 500x500),
or, with ``--trunks``, the paper's Table 1 columns for FCN-32s on every backbone (the ResNets at
each output stride) and torchvision's FCN (fcn_torchvision, with and without its auxiliary head);
counted with torch's FlopCounterMode on the meta device (docs/PERFORMANCE.md, docs/TRUNKS.md).

    python -m fcn_lightning.bench.model_cost [--size 500 500] [--classes 21] [--width 1.0]
                                             [--backbone vgg16] [--trunks]
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models import ARCHS, BACKBONES, GEOMETRIES, build_fcn
from ..models.trunks import DILATABLE, OUTPUT_STRIDES


def measure(size: tuple[int, int], **model: Any) -> dict[str, float]:
    """Of ``build_fcn(**model)`` at ``size``: parameters (M; all, and the learnt ones: Table 1
    leaves out the fixed bilinear upsampling), GFLOP of one forward pass in eval mode (no
    auxiliary head), and from the trunk's ``final`` tap the output stride, receptive field and
    conv layers (score_fr counted, as the paper counts the classifier)."""
    with torch.device("meta"):
        net = build_fcn(**model).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.empty(1, 3, *size, device="meta"))
    final = net.trunk.taps["final"]
    return {
        "params": sum(p.numel() for p in net.parameters()) / 1e6,
        "learnt": sum(p.numel() for p in net.parameters() if p.requires_grad) / 1e6,
        "gflop": counter.get_total_flops() / 1e9,
        "stride": final.stride,
        "field": final.field,
        "convs": final.depth + 1,  # + score_fr
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fcn_lightning.bench.model_cost", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--size", type=int, nargs=2, default=(500, 500), metavar=("H", "W"))
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--backbone", choices=BACKBONES, default="vgg16")
    parser.add_argument("--trunks", action="store_true", help="FCN-32s on every backbone")
    args = parser.parse_args(argv)
    if min(args.size) < 1 or args.classes < 1 or args.width <= 0:
        parser.error("--size needs two sizes of 1 pixel or more, --classes 1 or more, --width > 0")
    size, common = tuple(args.size), {"num_classes": args.classes, "width": args.width}
    print(f"input {size[0]}x{size[1]}, {args.classes} classes, width {args.width}")
    if args.trunks:
        print(f"{'backbone':<11}{'geometry':<10}{'out stride':>10}{'learnt params (M)':>19}{'GFLOP/fwd':>11}{'rf size':>9}{'conv layers':>13}")  # fmt: skip
        for backbone, geometry in itertools.product(BACKBONES, GEOMETRIES):
            for stride in OUTPUT_STRIDES if backbone in DILATABLE else (32,):
                m = measure(size, arch="fcn32s", backbone=backbone, geometry=geometry, output_stride=stride, **common)  # fmt: skip
                print(f"{backbone:<11}{geometry:<10}{stride:>10}{m['learnt']:>19.1f}{m['gflop']:>11.1f}{m['field']:>9}{m['convs']:>13}")  # fmt: skip
        # torchvision's fcn_resnet50 / 101 (21 classes, width 1): these counts equal its models'
        # parameters exactly, with aux_loss=True and without (35322218 / 32957013 for ResNet-50)
        print("\ntorchvision's FCN (fcn_torchvision, same geometry); GFLOP in eval: no aux head")
        print(f"{'net':<15}{'out stride':>10}{'learnt params (M)':>19}{'without aux (M)':>17}{'GFLOP/fwd':>11}")  # fmt: skip
        for backbone in DILATABLE:
            tv = dict(arch="fcn_torchvision", backbone=backbone, geometry="same", output_stride=8)
            m, bare = (measure(size, **tv, aux=aux, **common) for aux in (True, False))
            print(f"{'fcn_' + backbone:<15}{8:>10}{m['learnt']:>19.1f}{bare['learnt']:>17.1f}{m['gflop']:>11.1f}")  # fmt: skip
        return
    print(f"backbone {args.backbone}")
    print(f"{'arch':<16}{'geometry':<10}{'params (M)':>12}{'GFLOP/fwd':>12}")
    for arch, geometry in itertools.product(ARCHS, GEOMETRIES):
        if arch == "fcn_torchvision" and geometry == "paper":
            continue  # it interpolates its scores to the input: the same geometry only
        m = measure(size, arch=arch, backbone=args.backbone, geometry=geometry, **common)
        print(f"{arch:<16}{geometry:<10}{m['params']:>12.1f}{m['gflop']:>12.1f}")


if __name__ == "__main__":
    main()
