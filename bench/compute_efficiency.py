"""Benchmark 3: achieved training FLOP/s as a fraction of the machine's matmul rate, in fp32 or bf16.

FLOPs of one training step (forward + backward) are counted with
``torch.utils.flop_counter.FlopCounterMode``; the step (forward, backward, SGD update) is timed.
The matmul rate is that of a square ``torch.mm`` in the step's precision (fp32, or bf16 for
``--precision bf16-mixed``, where the step runs under bf16 autocast as ``trainer.precision`` does)
measured in the same process, between the training steps. On a shared machine every time is the
FASTEST of its repeats (the least disturbed by other processes), and the machine's rate is the
fastest matmul of the whole run.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src python bench/compute_efficiency.py
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src python bench/compute_efficiency.py --compile   # adds torch.compile
    # the CPU presets' models in bf16, against a 4096x4096 bf16 matmul, batch 512, compiled too:
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src python bench/compute_efficiency.py --precision bf16-mixed \
        --models ResNet-9 "ResNet-9 half width" "ResNet-9 airbench94 layout" ResNet-20 --batch-size 512 \
        --matmul-n 4096 --threads 2 --compile --compile-models "ResNet-9 half width" "ResNet-9 airbench94 layout"
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _common import machine, print_table
from torch.utils.flop_counter import FlopCounterMode

from resnet_cifar.models.factory import build_model

# The CPU presets' ResNet-9 options (conf/experiment/fast94.yaml, conf/model/resnet9.yaml)
PAGE = dict(name="resnet9", activation="celu", celu_alpha=0.3, pool_before_bn=True, bn_scale_trainable=False)
AIRBENCH94 = dict(
    name="resnet9",
    widths=[24, 64, 256, 256],
    stem="whiten",
    tails=["conv", "conv", "conv"],
    activation="gelu",
    pool_before_bn=True,
    bn_scale_trainable=False,
)
MODELS = {
    "ResNet-20": dict(name="resnet20"),
    "ResNet-18 (CIFAR stem)": dict(name="resnet18", pretrained=False, cifar_stem=True),
    "ResNet-9": dict(PAGE, widths=[64, 128, 256, 512]),
    "ResNet-9 half width": dict(PAGE, widths=[32, 64, 128, 256]),
    "ResNet-9 airbench94 layout": AIRBENCH94,
    "ResNet-9 airbench94 layout, widths 128-384": dict(AIRBENCH94, widths=[24, 128, 384, 384]),
}
PRECISIONS = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16}


def matmul_seconds(n: int, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Fastest of ``repeats`` square matmuls (the least disturbed by other processes)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return best


def training_step(model, opt, x, y, dtype: torch.dtype = torch.float32) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def step_flops(model, x, y) -> int:
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant (the fastest is used)")
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    p.add_argument("--matmul-n", type=int, default=1024)
    p.add_argument(
        "--matmul-only",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="only measure the fastest matmul over this many seconds, per thread count",
    )
    p.add_argument("--compile", action="store_true", help="add torch.compile variants (minutes of compilation)")
    p.add_argument("--precision", default="32-true", choices=list(PRECISIONS), help="bf16-mixed: bf16 autocast")
    p.add_argument("--models", nargs="+", default=list(MODELS)[:2], choices=list(MODELS))
    p.add_argument("--compile-models", nargs="+", default=["ResNet-20"], help="models that get the compile variant")
    args = p.parse_args()
    print(f"machine: {machine()}\n")
    if args.matmul_only:
        for threads in args.threads:
            torch.set_num_threads(threads)
            best, end = float("inf"), time.perf_counter() + args.matmul_only
            while time.perf_counter() < end:
                best = min(best, matmul_seconds(args.matmul_n))
            n = args.matmul_n
            print(f"{threads} threads: fastest {n}x{n} fp32 torch.mm: {2 * n**3 / best / 1e9:.1f} GFLOP/s")
        return
    dtype = PRECISIONS[args.precision]
    variants = [("NCHW", False, False), ("channels_last", True, False)]
    if args.compile:  # inductor (the default backend), on the faster layout
        variants.append(("channels_last, torch.compile", True, True))
    rows: list[list] = []
    best_mm_all, best_mm_threads = float("inf"), 0
    for threads in args.threads:
        torch.set_num_threads(threads)
        for model_name, kw in MODELS.items():
            if model_name not in args.models:
                continue
            for label, channels_last, compiled in variants:
                if compiled and model_name not in args.compile_models:
                    continue
                torch.manual_seed(0)
                model = build_model(num_classes=10, **kw).train()
                x = torch.randn(args.batch_size, 3, 32, 32)
                y = torch.randint(0, 10, (args.batch_size,))
                if channels_last:
                    model = model.to(memory_format=torch.channels_last)
                    x = x.contiguous(memory_format=torch.channels_last)
                flops = step_flops(model, x, y)
                run = torch.compile(model) if compiled else model
                opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
                t0 = time.perf_counter()
                training_step(run, opt, x, y, dtype)  # warm-up (and compilation)
                warm = time.perf_counter() - t0
                best_step, best_mm = float("inf"), float("inf")
                for _ in range(args.steps):
                    best_mm = min(best_mm, matmul_seconds(args.matmul_n, dtype=dtype))
                    t0 = time.perf_counter()
                    training_step(run, opt, x, y, dtype)
                    best_step = min(best_step, time.perf_counter() - t0)
                if best_mm < best_mm_all:
                    best_mm_all, best_mm_threads = best_mm, threads
                rate = flops / best_step
                rows.append(
                    [
                        threads,
                        model_name,
                        label,
                        f"{flops / args.batch_size / 1e9:.3f}",
                        f"{args.batch_size / best_step:,.0f}",
                        rate,
                        f"{warm:.1f}",
                    ]
                )
                print(
                    *rows[-1], f"(matmul now {2 * args.matmul_n**3 / best_mm / 1e9:.1f} GFLOP/s)", sep=" | ", flush=True
                )
    mm_rate = 2 * args.matmul_n**3 / best_mm_all
    for r in rows:
        rate = r[5]
        r[5:6] = [f"{rate / 1e9:.1f}", f"{rate / mm_rate:.0%}"]
    n, threads = args.matmul_n, best_mm_threads
    kind = "bf16" if dtype == torch.bfloat16 else "fp32"
    print(f"\n{args.precision}, batch {args.batch_size}, fastest of {args.steps} steps;", end=" ")
    print(f"the machine's {kind} matmul rate")
    print(f"(fastest {n}x{n} torch.mm of the run, {threads} threads): {mm_rate / 1e9:.1f} GFLOP/s\n")
    headers = ["threads", "model", "variant", "train GFLOP/image", "images/s", "GFLOP/s", "fraction of matmul"]
    headers += ["first step s"]
    print_table(headers, rows)


if __name__ == "__main__":
    main()
