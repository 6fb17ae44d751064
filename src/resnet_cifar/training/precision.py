"""``trainer.precision: auto``: the fastest precision of the machine a run starts on.

Lightning has no ``auto`` precision: it trains in fp32 unless told otherwise, although bf16
autocast trains ResNet-20 1.5-1.7x faster on CPUs with bf16 instructions (AMX on Intel Xeon
since Sapphire Rapids, AVX512-BF16 on AMD EPYC since Zen 4: BENCHMARKS.md, ``bench/train_speed.py``)
and on every GPU since Ampere, while on CPUs without them bf16 emulation runs ~10x slower.
So :func:`resolve_precision` decides once, before the Trainer is built:

- CUDA, compute capability >= 8.0 (Ampere and newer): ``bf16-mixed`` (no gradient scaling);
- CUDA, older: ``16-mixed`` (float16 autocast with gradient scaling);
- CPU with AMX-BF16 or AVX512-BF16: ``bf16-mixed``;
- anything else (CPUs with AVX2 only, Apple MPS): ``32-true``.

An explicit ``trainer.precision`` always wins. The choice and its reason are logged, written
into the run's config (so the loggers' hyperparameters show the precision that ran), into
``metrics.json`` and into the checkpoints; ``eval.py``'s ``auto`` is the checkpoint's precision,
so that it repeats the training run's test numbers, where the device runs it natively
(:func:`checkpoint_auto`), else the device's own ``auto``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

AUTO = "auto"
# CPU instruction sets that run bf16 matmuls and convolutions natively (oneDNN uses them under autocast).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags: ``torch.cpu.get_capabilities()`` (torch >= 2.14), else Linux's ``cpuinfo``."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        try:
            return {name for name, present in dict(get()).items() if present}
        except Exception:  # noqa: BLE001 - a capability probe must never stop a run
            pass
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_instructions() -> str | None:
    """The CPU's native bf16 instruction set (``AMX-BF16``, ``AVX512-BF16``), or None."""
    flags = cpu_flags()
    return next((flag.upper().replace("_", "-") for flag in BF16_CPU_FLAGS if flag in flags), None)


def _accelerator_type(accelerator: Any) -> str:
    """``cuda``, ``mps`` or ``cpu``: the device Lightning will train on for ``trainer.accelerator``."""
    name = str(accelerator or AUTO).lower()
    if name in ("cuda", "gpu", AUTO) and torch.cuda.is_available():
        return "cuda"
    if name in ("mps", "gpu", AUTO) and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu" if name in ("cpu", AUTO) else name


def resolve_precision(requested: Any, accelerator: Any = AUTO) -> tuple[str, str]:
    """``(precision, reason)`` for ``trainer.precision=requested`` on ``trainer.accelerator=accelerator``."""
    if str(requested) != AUTO:
        return str(requested), "set in the config"
    device = _accelerator_type(accelerator)
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        gpu = f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"
        if major >= 8:
            return "bf16-mixed", f"CUDA GPU {gpu} supports bf16"
        return "16-mixed", f"CUDA GPU {gpu} has no fast bf16: float16 with gradient scaling"
    if device == "cpu":
        found = bf16_instructions()
        if found:
            return "bf16-mixed", f"CPU with {found}"
        return "32-true", "CPU without AMX-BF16 or AVX512-BF16 (bf16 would be emulated, ~10x slower)"
    return "32-true", f"{device}: no mixed precision chosen automatically"


def _not_native(precision: str, device: str) -> str | None:
    """Why ``device`` (``cuda``, ``cpu``, ``mps``) does not run ``precision`` natively, or None where it does."""
    kind = precision.split("-")[0]  # bf16, 16, 32, 64 (Lightning's names and their short forms)
    if kind in ("32", "64"):
        return None
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        if kind == "bf16" and major < 8:
            return f"needs compute capability >= 8.0, this GPU has {major}.{minor}"
        return None
    if device == "cpu" and kind == "bf16":
        return None if bf16_instructions() else "would be emulated on a CPU without AMX-BF16 or AVX512-BF16"
    if device == "cpu" and kind == "16":
        return "has no float16 autocast on a CPU"
    return f"is not native on {device}"


def checkpoint_auto(trained: str | None, accelerator: Any = AUTO) -> tuple[str, str] | None:
    """``(precision, reason)`` that eval.py's ``auto`` means for a checkpoint trained in ``trained`` (None: unknown).

    The checkpoint's precision repeats the training run's test numbers, but only where this device runs it
    natively: emulated bf16 is ~10x slower, and Lightning refuses float16 autocast on a CPU. Elsewhere the
    device's own ``auto``, with the reason saying why.
    """
    if not trained:
        return None
    missing = _not_native(str(trained), _accelerator_type(accelerator))
    if missing is None:
        return str(trained), "as the checkpoint was trained and tested"
    precision, reason = resolve_precision(AUTO, accelerator)
    return precision, f"the checkpoint's {trained} {missing}: this device's auto, {reason}"


def apply_auto_precision(trainer_cfg: Any, auto: tuple[str, str] | None = None) -> tuple[str, str]:
    """Resolve ``trainer_cfg.precision`` in place (a DictConfig or dict), log it, return ``(precision, reason)``.

    ``auto``: what ``auto`` stands for instead of the machine's fastest (eval.py: the checkpoint's precision).
    """
    requested = trainer_cfg.get("precision", AUTO)
    if str(requested) == AUTO and auto is not None:
        precision, reason = auto
    else:
        precision, reason = resolve_precision(requested, trainer_cfg.get("accelerator", AUTO))
    trainer_cfg["precision"] = precision
    log.info("precision %s: %s", precision, reason)
    return precision, reason
