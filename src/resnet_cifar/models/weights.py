"""Safe loading of weights files and partial loading into a :class:`Classifier`.

Everything is read with ``torch.load(..., weights_only=True)``: a file that needs
arbitrary unpickling (and so could run code) is refused. Accepted files: a torchvision
state dict (``conv1.weight`` ... ``fc.bias``), one of our Lightning checkpoints, or one
of our exported state dicts (``backbone.*``/``head.*``; ``.safetensors`` too).
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnet_cifar.errors import WeightsError

log = logging.getLogger(__name__)


def safe_load(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True`` and errors a user can act on."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"{what} {path} does not exist (or is not a file)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{what} {path} is not a valid safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"unsupported GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)", str(e))
        if not found:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise WeightsError(f"{what} {path} is not a PyTorch checkpoint or is truncated ({reason})") from None
        name = found.group(1) or found.group(2)
        raise WeightsError(
            f"{what} {path} was refused: it needs arbitrary unpickling ({name}), which can run code. "
            "Load only files you trust, re-saved as a plain state_dict of tensors"
        ) from None
    except Exception as e:  # torch.load fails on junk with many types (RuntimeError, KeyError, EOFError, ...)
        raise WeightsError(
            f"{what} {path} is not a PyTorch checkpoint or is truncated ({type(e).__name__}: {str(e)[:160]})"
        ) from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{what} {path} holds a {type(obj).__name__}, expected a dict (state dict or checkpoint)")
    return obj


def extract_state_dict(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint or state dict, with keys mapped to ``backbone.*``/``head.*``."""
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict):
        raise WeightsError("the file's 'state_dict' entry is not a dict of tensors")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        k = key.removeprefix("model.").removeprefix("_orig_mod.").removeprefix("module.")
        if k.startswith(("backbone.", "head.")):
            out[k] = value
        elif k.startswith("fc."):  # torchvision's classifier
            out["head." + k.removeprefix("fc.")] = value
        else:
            out["backbone." + k] = value
    return out


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        by_part: dict[str, int] = {}
        for k in self.loaded:
            by_part[k.split(".")[0]] = by_part.get(k.split(".")[0], 0) + 1
        parts = [f"loaded {len(self.loaded)} tensors ({', '.join(f'{p}.*: {n}' for p, n in by_part.items())})"]
        if self.skipped:
            parts.append(f"not loaded on request: {_abbrev(self.skipped)}")
        if self.mismatched:
            mm = ", ".join(f"{k} {tuple(a)} vs model {tuple(b)}" for k, (a, b) in self.mismatched.items())
            parts.append(f"skipped for shape mismatch: {mm}")
        if self.missing:
            parts.append(f"left at initialisation: {_abbrev(self.missing)}")
        if self.unexpected:
            parts.append(f"unused from the file: {_abbrev(self.unexpected)}")
        return "; ".join(parts)


def _abbrev(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_matching(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    reinit: tuple[str, ...] = (),
    skip_prefixes: tuple[str, ...] = (),
) -> LoadReport:
    """Load ``state`` into ``model``: the whole backbone must fit; the head loads only if it fits.

    Backbone keys starting with one of ``reinit`` (e.g. a replaced stem, relative to
    ``backbone.``) may be missing or of another shape and stay at initialisation. Keys
    starting with one of ``skip_prefixes`` (e.g. ``"head."``) are not loaded. Everything
    left out is reported by key: the summary at INFO, the full lists at DEBUG.
    """
    own = model.state_dict()
    report = LoadReport()
    fit = {}
    for k, v in state.items():
        if skip_prefixes and k.startswith(skip_prefixes):
            report.skipped.append(k)
        elif k not in own:
            report.unexpected.append(k)
        elif own[k].shape != v.shape:
            report.mismatched[k] = (tuple(v.shape), tuple(own[k].shape))
        else:
            fit[k] = v
    report.loaded = sorted(fit)
    report.missing = [k for k in own if k not in fit and k not in report.mismatched and k not in report.skipped]

    def strict(k: str) -> bool:
        return k.startswith("backbone.") and not k.removeprefix("backbone.").startswith(reinit)

    bad_shape = {k: v for k, v in report.mismatched.items() if strict(k)}
    missing = [k for k in report.missing if strict(k)]
    if bad_shape or missing:
        detail = []
        if bad_shape:
            detail.append("shape mismatch: " + _abbrev([f"{k} {a} vs model {b}" for k, (a, b) in bad_shape.items()], 4))
        if missing:
            detail.append(f"missing from the file: {_abbrev(missing, 4)}")
        raise WeightsError(
            f"{source} does not fit this model's backbone ({'; '.join(detail)}); is it a file for this architecture?"
        )
    model.load_state_dict(fit, strict=False)
    log.info("weights from %s: %s", source, report.summary())
    log.debug("loaded keys: %s", ", ".join(report.loaded))
    left_out = [*report.skipped, *report.mismatched, *report.missing]
    log.debug("keys left at initialisation: %s", ", ".join(left_out) or "none")
    return report
