"""Lookahead (training/lookahead.py): the sync arithmetic on known values, its ramp, and its settings."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from resnet_cifar.errors import ConfigError
from resnet_cifar.training.lookahead import Lookahead


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.bn = nn.BatchNorm1d(1)  # float running statistics follow, the integer step count does not

    def training_progress(self, step: int) -> float:
        return step / 10


def run(cb: Lookahead, module: Tiny, weights: list[float]) -> list[float]:
    """Set the weight as the optimizer would have, end optimizer step k (1-based); the weight after the callback."""
    cb.on_train_start(SimpleNamespace(), module)
    out = []
    for step, w in enumerate(weights, start=1):
        module.w.data.fill_(w)
        module.bn.running_mean.fill_(w)
        cb.on_train_batch_end(SimpleNamespace(global_step=step), module, None, None, step - 1)
        out.append(module.w.item())
    return out


def test_every_k_steps_the_weights_return_towards_the_slow_copy():
    cb = Lookahead(every_n_steps=2, decay=0.5, ramp="none")
    module = Tiny()
    # step 2: slow 0 -> 0 + 0.5 (4 - 0) = 2, weights set to 2; step 4: slow 2 -> 2 + 0.5 (6 - 2) = 4
    assert run(cb, module, [1.0, 4.0, 5.0, 6.0]) == pytest.approx([1.0, 2.0, 5.0, 4.0])
    assert module.bn.running_mean.item() == pytest.approx(4.0)  # batch-norm statistics move with the weights
    assert int(module.bn.num_batches_tracked) == 0


def test_the_cubic_ramp_follows_early_and_holds_late():
    cb = Lookahead(every_n_steps=1, decay=0.8)
    assert cb.decay_at(0.0) == 0.0 and cb.decay_at(0.5) == pytest.approx(0.1) and cb.decay_at(1.0) == 0.8
    module = Tiny()
    # step 1 (progress 0.1): d = 0.0008, the weights barely move back; step 10 (progress 1): d = 0.8
    out = run(cb, module, [10.0] + [10.0] * 8 + [20.0])
    assert out[0] == pytest.approx(10.0 * (1 - 0.8 * 0.1**3))
    slow_before_last = out[-2]
    assert out[-1] == pytest.approx(slow_before_last + 0.2 * (20.0 - slow_before_last))


def test_the_slow_copy_is_saved_and_restored():
    cb = Lookahead(every_n_steps=2, decay=0.5, ramp="none")
    run(cb, Tiny(), [1.0, 4.0])
    state = cb.state_dict()
    again = Lookahead(every_n_steps=2, decay=0.5, ramp="none")
    again.load_state_dict(state)
    module = Tiny()
    again.on_train_start(SimpleNamespace(), module)  # a resume: the slow copy comes from the checkpoint
    assert again.slow[0].item() == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": 0}, "callbacks.lookahead.every_n_steps=0"),
        ({"decay": 1.0}, r"callbacks.lookahead.decay=1.0: expected a number in \[0, 1\)"),
        ({"ramp": "linear"}, "callbacks.lookahead.ramp='linear'"),
    ],
)
def test_bad_settings_are_one_line_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Lookahead(**kwargs)
