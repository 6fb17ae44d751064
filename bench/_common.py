"""Shared helpers of the benchmark scripts: the data root, timing, and printing a table."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

from resnet_cifar import CONFIG_DIR
from resnet_cifar.training.precision import bf16_instructions

DATA_ROOT = os.environ.get("RESNET_CIFAR_DATA", "data")


def compose(overrides: list[str], output_dir: str | os.PathLike = ".") -> DictConfig:
    """train.py's config with ``overrides``, outside a Hydra run (``paths.output_dir`` given)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=[*overrides, f"paths.output_dir={output_dir}"])


def machine(with_load: bool = True) -> str:
    """One line naming the machine the numbers come from (and its load average now)."""
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    bf16 = bf16_instructions() or "no bf16 instructions"
    line = f"{model} ({bf16}), {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if not with_load:
        return line
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{line}, load average {load:.1f} at start"


def cpu_seconds() -> float:
    """CPU time of this process plus its live children (DataLoader workers), user + system."""
    total = time.process_time()
    me, tick = os.getpid(), os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # ppid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def timed(fn: Callable[[], int], min_seconds: float = 2.0, max_calls: int = 1000) -> tuple[float, float]:
    """Calls ``fn`` (which returns a count of items) until ``min_seconds`` have passed.

    Returns items per wall-clock second and items per CPU second (this process and its children):
    on a shared machine the second one does not depend on how much of the CPU the others leave.
    """
    items, calls = 0, 0
    start, cpu0 = time.perf_counter(), cpu_seconds()
    while True:
        items += fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds or calls >= max_calls:
            return items / elapsed, items / max(cpu_seconds() - cpu0, 1e-9)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A Markdown table (pastes into BENCHMARKS.md as is)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(cells[0]))
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for r in cells[1:]:
        print(line(r))
