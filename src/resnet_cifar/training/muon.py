"""Muon for the conv filters and SGD for everything else, in one optimizer (airbench94_muon's split).

Muon (Keller Jordan, 2024) replaces a weight's momentum update by its nearest semi-orthogonal
matrix (a few Newton-Schulz iterations on the update reshaped to ``(out, in * kh * kw)``): every
direction of the filter bank moves by the same amount, whatever the gradient's conditioning.
airbench94_muon trains the conv filters of its CIFAR-10 network so and the head and biases by SGD,
and reaches 94% in 8 epochs instead of 10.

Why our own class instead of ``torch.optim.Muon`` (torch >= 2.9): torch's accepts 2-D parameters
only (it raises on a conv's 4-D filters), and Lightning's automatic optimization steps one optimizer,
so the filters' Muon and the rest's SGD must live in one optimizer (one state dict in checkpoints,
one set of groups for the LR schedule). The SGD groups are stepped by torch's own functional
``torch.optim.sgd.sgd``; the Muon groups follow ``torch.optim.Muon``'s algorithm (momentum as
``lerp``, Nesterov, the same quintic Newton-Schulz coefficients, the update scaled by
``sqrt(max(1, rows / cols))``), with one option of airbench's: ``normalize``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.sgd import sgd

# torch.optim.Muon's (and Keller Jordan's) quintic Newton-Schulz coefficients
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(update: torch.Tensor, steps: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately ``U V^T`` of ``update = U S V^T`` (2-D) by ``steps`` quintic Newton-Schulz iterations.

    As in torch.optim.Muon: the singular values end near, not at, 1 (roughly in [0.7, 1.2]), which
    trains as well as the exact polar factor at a fraction of the cost.
    """
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@functools.cache
def fast_dtype(device_type: str) -> torch.dtype:
    """bf16 for the iterations where matmuls are fast in it (CUDA, CPUs with AMX/AVX512-BF16), else fp32.

    On a CPU without bf16 instructions a bf16 matmul is ~10x slower than fp32 (README: Speed).
    """
    if device_type == "cuda":
        return torch.bfloat16
    from resnet_cifar.training.precision import bf16_instructions

    return torch.bfloat16 if bf16_instructions() else torch.float32


class MuonSGD(torch.optim.Optimizer):
    """Muon on the parameter groups with ``muon=True``, SGD (momentum, Nesterov, weight decay) on the others.

    Group options (defaults from the constructor): ``lr``, ``weight_decay``; SGD groups ``momentum``,
    ``nesterov``; Muon groups ``muon_momentum``, ``muon_nesterov``, ``ns_steps`` and ``normalize``.
    Muon's weight decay is decoupled (``p *= 1 - lr * weight_decay``, as torch.optim.Muon); with
    ``normalize`` each weight is instead rescaled to the norm ``sqrt(rows)`` before its step
    (airbench94_muon): the layers before batch norm are scale-invariant, and a fixed norm keeps the
    relative size of Muon's fixed-size updates, the effective learning rate, constant.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        muon_momentum: float = 0.95,
        muon_nesterov: bool = True,
        ns_steps: int = 5,
        normalize: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            muon=False,
            muon_momentum=muon_momentum,
            muon_nesterov=muon_nesterov,
            ns_steps=ns_steps,
            normalize=normalize,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon groups take matrices and conv filters (2 or more dimensions)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["muon"]:
                self._muon_step(group, params)
                continue
            buffers = [self.state[p].get("momentum_buffer") for p in params]
            sgd(
                params,
                [p.grad for p in params],
                buffers,
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                lr=group["lr"],
                dampening=0.0,
                nesterov=group["nesterov"],
                maximize=False,
            )
            for p, buf in zip(params, buffers):
                self.state[p]["momentum_buffer"] = buf
        return loss

    def _muon_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, m = group["lr"], group["muon_momentum"]
        for p in params:
            grad = p.grad.reshape(len(p), -1)
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grad)
            buf = state["momentum_buffer"]
            buf.lerp_(grad, 1 - m)
            update = grad.lerp(buf, m) if group["muon_nesterov"] else buf
            update = orthogonalize(update, group["ns_steps"], fast_dtype(p.device.type))
            rows, cols = update.shape
            if group["normalize"]:
                p.mul_(rows**0.5 / p.norm().clamp(min=1e-12))
            elif group["weight_decay"]:
                p.mul_(1 - lr * group["weight_decay"])
            p.add_(update.view_as(p).to(p.dtype), alpha=-lr * max(1.0, rows / cols) ** 0.5)
