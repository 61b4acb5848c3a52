"""Speed: training and inference of FCN-8s, in one process, with the card's name; its rows (a)
to (d) and what to compare them with: docs/PERFORMANCE.md.

    python -m fcn_lightning.bench            # on a GPU: the settings of docs/PERFORMANCE.md
    python -m fcn_lightning.bench --quick    # tiny sizes on any device (what the tests run)
"""

from __future__ import annotations

import argparse
import tempfile
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import LambdaCallback
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from ..models import build_fcn
from ..module import FCNModule


@dataclass
class Setting:
    batch: int
    size: int
    width: float
    bf16: bool
    fast: bool  # channels_last + torch.compile + fused optimizer (GPU only)
    geometry: str = "paper"

    @property
    def arch(self) -> dict[str, object]:
        return dict(arch="fcn8s", num_classes=21, width=self.width, geometry=self.geometry)

    @property
    def flops(self) -> float:  # of one forward pass of the batch, counted on the meta device
        with torch.device("meta"):
            model = build_fcn(**self.arch).eval()
            x = torch.empty(self.batch, 3, self.size, self.size)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
        return float(counter.get_total_flops())


def _now() -> float:  # once the GPU's queued work is done
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def _timed(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Seconds per call, after warm-up."""
    for _ in range(warmup):
        fn()
    return timeit.Timer(fn, timer=_now).timeit(iters) / iters


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Achieved TFLOP/s of an n x n matrix product: the ceiling rates are compared to."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / _timed(lambda: a @ b, 3, 10) / 1e12


def train_step_fn(setting: Setting, device: torch.device, plain: bool) -> Callable[[], None]:
    """One SGD step. ``plain``: the textbook loop (no switches); else our module's loss and the
    speed switches that apply on this device."""
    fast = setting.fast and device.type == "cuda"
    x = torch.randn(setting.batch, 3, setting.size, setting.size, device=device)
    y = torch.randint(0, 21, (setting.batch, setting.size, setting.size), device=device)
    module = None if plain else FCNModule(setting.arch)
    model = (build_fcn(**setting.arch) if plain else module.model).to(device).train()
    with torch.no_grad():  # the score layers non-zero, so that every layer gets gradients
        for name, p in model.named_parameters():
            if name.split(".")[2].startswith("score"):  # score_fr, score_pool4, score_pool3
                p.normal_(std=0.01)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-10, momentum=0.99, fused=fast or None)
    if fast:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        model.compile()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=setting.bf16 and not plain):
            out = model(x)
            if plain:
                loss = F.cross_entropy(out["out"], y, ignore_index=255)
            else:
                loss = module.loss(out, {"out": y})
        loss.backward()
        opt.step()

    return step


def lightning_loop_rate(setting: Setting, device: torch.device, steps: int) -> float:
    """Images per second of a whole Lightning fit (in-memory data, metrics and logging on)."""
    s, n = setting.size, setting.batch * (steps + 3)
    batches = [(torch.randn(3, s, s), {"out": torch.randint(0, 21, (s, s))}) for _ in range(n)]
    loader = DataLoader(batches, batch_size=setting.batch, pin_memory=device.type == "cuda")
    fused = (device.type == "cuda" and setting.fast) or None
    opt = {"name": "sgd", "lr": 1e-10, "momentum": 0.99, "fused": fused}
    mode = "default" if setting.fast else None
    module = FCNModule(setting.arch, optimizer=opt, channels_last=setting.fast, compile=mode)
    times: list[float] = []  # synced: when step 3 (after the warm-up) starts, each step ends
    clock = LambdaCallback(
        on_train_batch_start=lambda *a: a[-1] == 3 and times.append(_now()),
        on_train_batch_end=lambda *a: a[-1] >= 3 and times.append(_now()),
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            accelerator=device.type, devices=1, max_steps=steps + 3,
            precision="bf16-mixed" if setting.bf16 else "32-true",
            logger=pl.loggers.TensorBoardLogger(tmp, name="bench"), log_every_n_steps=10,
            callbacks=[clock], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, benchmark=device.type == "cuda",
        )  # fmt: skip
        # the val loader is given and skipped: Lightning warns about a validation_step without one
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    return (len(times) - 1) * setting.batch / max(times[-1] - times[0], 1e-9)


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(
        prog="python -m fcn_lightning.bench", description="FCN-8s training and inference speed"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: measures nothing")
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu, quick = device.type == "cuda", args.quick
    iters = args.iters or (2 if quick else 30)
    card = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    w = 1 / 16 if quick else 1.0
    paper = Setting(1, 64 if quick else 500, w, bf16=False, fast=False)
    big = Setting(2 if quick else 8, 64 if quick else 512, w, bf16=True, fast=True)
    n = 256 if quick else 8192
    ceiling = {k: matmul_ceiling(device, t, n) for k, t in (("fp32", torch.float32), ("bf16", torch.bfloat16))}  # fmt: skip
    rows: list[dict[str, object]] = []

    def add(prefix: str, st: Setting, seconds: float, flops: float) -> None:
        mode = "bf16+fast" if st.bf16 and st.fast else ("bf16" if st.bf16 else "fp32")
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if gpu else float("nan")
        tflops = flops / seconds / 1e12
        rows.append({
            "row": f"{prefix} {mode}, b{st.batch}, {st.size}px, {st.geometry}", "img_s": st.batch / seconds,
            "ms": seconds * 1e3, "tflops": tflops, "ceiling_share": tflops / ceiling["bf16" if st.bf16 else "fp32"], "peak_gib": peak,
        })  # fmt: skip
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)

    for prefix, setting, plain in (
        ("a  plain loop,", paper, True),
        ("b1 our step,", paper, False),
        ("b2 our step,", big, False),
        ("b3 our step,", replace(big, geometry="same"), False),
    ):
        step = train_step_fn(setting, device, plain)
        add(prefix, setting, _timed(step, 2 if quick else 5, iters), 3 * setting.flops)
    add("c  Lightning,", big, big.batch / lightning_loop_rate(big, device, iters), 3 * big.flops)
    for bf16 in (False, True):
        setting = Setting(1, paper.size, w, bf16=bf16, fast=bf16)
        model = build_fcn(**setting.arch).to(device).eval()
        x = torch.randn(1, 3, setting.size, setting.size, device=device)
        if bf16 and gpu:
            model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)

        def infer(model=model, x=x, bf16=bf16):
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                return model(x)

        add("d  inference,", setting, _timed(infer, 2 if quick else 10, iters * 2), setting.flops)
    base, note = rows[0]["img_s"], "; --quick: sizes are tiny, numbers mean nothing" * quick
    print(f"device: {card}; matmul ceiling fp32/tf32 {ceiling['fp32']:.1f}, bf16 {ceiling['bf16']:.1f} TFLOP/s{note}")  # fmt: skip
    print(f"{'row':<46}{'img/s':>9}{'ms':>9}{'TFLOP/s':>9}{'ceiling':>9}{'peak GiB':>10}{'x (a)':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['row']:<46}{r['img_s']:>9.1f}{r['ms']:>9.2f}{r['tflops']:>9.2f}{100 * r['ceiling_share']:>8.1f}%{r['peak_gib']:>10.2f}{r['img_s'] / base:>8.2f}")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
