"""Model cost: parameters and forward FLOPs of every arch in both geometries (default 500x500).

    python -m fcn_lightning.bench.model_cost [--size 500 500] [--classes 21] [--width 1.0]

Counted with torch's FlopCounterMode on the meta device: no memory, no compute, any machine.
The paper geometry's FCN-8s costs 363 GFLOP at 500x500 (docs/PAPER.md, Network geometry).
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models import ARCHS, build_fcn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fcn_lightning.bench.model_cost", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--size", type=int, nargs=2, default=(500, 500), metavar=("H", "W"))
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--width", type=float, default=1.0)
    args = parser.parse_args(argv)
    if min(args.size) < 1 or args.classes < 1 or args.width <= 0:
        parser.error("--size needs two sizes of 1 pixel or more, --classes 1 or more, --width > 0")
    print(f"input {args.size[0]}x{args.size[1]}, {args.classes} classes, width {args.width}")
    print(f"{'arch':<14}{'geometry':<10}{'params (M)':>12}{'GFLOP/fwd':>12}")
    for arch in ARCHS:
        for geometry in ("paper", "same"):
            with torch.device("meta"):
                model = build_fcn(
                    arch, num_classes=args.classes, geometry=geometry, width=args.width
                ).eval()
                x = torch.empty(1, 3, *args.size)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(x)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            print(
                f"{arch:<14}{geometry:<10}{params:>12.1f}{counter.get_total_flops() / 1e9:>12.1f}"
            )


if __name__ == "__main__":
    main()
