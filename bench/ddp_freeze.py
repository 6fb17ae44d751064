"""Cost of the two ways to run a frozen backbone under DDP, measured side by side.

  freeze-aware: the frozen parameters are left out of DDP (FreezeAwareDDPStrategy), re-wrapped at unfreeze
  find_unused:  DistributedDataParallel(find_unused_parameters=True) for the whole run

Two processes (gloo, CPU), one thread each; a training step = forward, backward, SGD step.
Rounds alternate the two modes so that load on a shared machine hits both alike.

    PYTHONPATH=src python bench/ddp_freeze.py --models resnet20 resnet18 --batch 32 --steps 10 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from resnet_cifar.models.factory import build_model


class Net(nn.Module):
    """The forward of ImageClassifier: the backbone runs under no_grad (and in eval mode) while frozen."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.clf = build_model(name)
        self.frozen = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            self.clf.backbone.eval()
            with torch.no_grad():
                f = self.clf.backbone(x)
            return self.clf.head(f)
        self.clf.backbone.train()
        return self.clf(x)


def wrap(net: Net, mode: str) -> DDP:
    frozen = [f"clf.backbone.{n}" for n, _ in net.clf.backbone.named_parameters()] if net.frozen else []
    DDP._set_params_and_buffers_to_ignore_for_model(net, frozen if mode == "freeze-aware" else [])
    return DDP(net, find_unused_parameters=mode == "find_unused")


def worker(rank: int, args: argparse.Namespace, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(rank)
    modes = ("freeze-aware", "find_unused")
    for name in args.models:
        net = Net(name)
        x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
        for frozen in (True, False):
            net.frozen = frozen
            times: dict[str, list[float]] = {m: [] for m in modes}
            for _ in range(args.rounds):
                for mode in modes:
                    ddp = wrap(net, mode)
                    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
                    for i in range(args.steps + 1):  # the first step of each wrap is not timed
                        dist.barrier()
                        t = time.perf_counter()
                        loss = F.cross_entropy(ddp(x), y)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        if i:
                            times[mode].append(time.perf_counter() - t)
                    del ddp
            if rank == 0:
                out[(name, "frozen" if frozen else "unfrozen")] = {m: statistics.median(v) for m, v in times.items()}
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet18"])
    p.add_argument("--batch", type=int, default=32, help="images per process")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--port", type=int, default=29531)
    args = p.parse_args()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(args, out), nprocs=2, join=True)
        rows = dict(out)
    n = args.steps * args.rounds
    print(f"2 processes (gloo, CPU), batch {args.batch}/process, median of {n} steps")
    print("ratio = find_unused / freeze-aware")
    print(f"{'model':<10} {'phase':<9} {'freeze-aware ms':>16} {'find_unused ms':>15} {'ratio':>6}")
    for (name, phase), t in rows.items():
        a, b = t["freeze-aware"] * 1e3, t["find_unused"] * 1e3
        print(f"{name:<10} {phase:<9} {a:>16.1f} {b:>15.1f} {b / a:>6.2f}")


if __name__ == "__main__":
    main()
