"""LR schedules: their values per step, and the time-budget mode of the CPU presets."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import compose_cfg
from pytorch_lightning.callbacks import Timer

from resnet_cifar.config import validate_train_config
from resnet_cifar.errors import ConfigError
from resnet_cifar.training.optim import TIME_STEPS, budget_progress, build_scheduler


def _lrs(cfg: dict, total: int, max_epochs: int = 10, lr: float = 1.0, progress=None) -> list[float]:
    """The LR used at each of ``total`` steps."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_scheduler(cfg, opt, total_steps=total, max_epochs=max_epochs, time_progress=progress)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_warms_up_linearly_then_decays_to_the_floor():
    # 100 steps over 10 epochs: 1 warm-up epoch = 10 steps
    lrs = _lrs({"name": "cosine", "warmup_epochs": 1, "min_lr_ratio": 0.1}, total=100)
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    t = (55 - 10) / 90  # halfway through the decay: the mean of peak and floor
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_multistep_divides_at_the_he_milestones():
    # experiment=resnet20_he2016: /10 at 50% and 75% of the steps
    lrs = _lrs({"name": "multistep", "milestones": [0.5, 0.75], "gamma": 0.1}, total=64, lr=0.1)
    assert lrs[31] == pytest.approx(0.1) and lrs[32] == pytest.approx(0.01)
    assert lrs[47] == pytest.approx(0.01) and lrs[48] == pytest.approx(0.001)


def test_onecycle_peaks_at_pct_start():
    cfg = {"name": "onecycle", "pct_start": 0.25, "div_factor": 25.0, "final_div_factor": 1e4}
    lrs = _lrs(cfg, total=100, lr=0.2)
    assert lrs[0] == pytest.approx(0.2 / 25)
    assert max(lrs) == pytest.approx(0.2) and lrs.index(max(lrs)) == 24
    assert lrs[-1] < 0.2 / 25 / 1e3


def test_onecycle_too_short_for_torchs_warmup_keeps_its_shape():
    """torch's OneCycleLR divides by zero when pct_start * total_steps <= 1 (4 steps at 0.25): a smoke run of
    the default recipe gets the same shape, up from lr / div_factor and down towards lr / div / final_div."""
    cfg = {"name": "onecycle", "pct_start": 0.25, "div_factor": 25.0, "final_div_factor": 1e4}
    long = _lrs(cfg, total=5, lr=0.2)  # torch's
    assert long[0] == pytest.approx(0.2 / 25) and long[-1] < 0.2 / 25
    short = _lrs(cfg, total=4, lr=0.2)  # one warm-up step ending at the peak, then a straight line down
    assert short[:2] == pytest.approx([0.2, 0.2]) and short[-1] == pytest.approx(0.2 / 25 / 1e4)
    assert short[-1] < short[2] < 0.2
    tiny = _lrs(cfg, total=1, lr=0.2)
    assert len(tiny) == 1 and 0 < tiny[0] <= 0.2


def test_time_budget_schedule_follows_the_clock_not_the_steps():
    cfg = {"name": "onecycle", "pct_start": 0.25, "div_factor": 25.0, "final_div_factor": 1e4, "progress": "time"}
    clock = {"t": 0.0}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = build_scheduler(cfg, opt, total_steps=1, max_epochs=-1, time_progress=lambda step: clock["t"])
    seen = {}
    for t in (0.0, 0.125, 0.25, 0.625, 1.0):
        clock["t"] = t
        opt.step()
        sched.step()  # any number of steps may have passed: only the clock counts
        seen[t] = opt.param_groups[0]["lr"]
    tol = 1e-4  # the resolution: one of TIME_STEPS virtual steps of the warm-up at lr 0.2 is 7.7e-5
    assert seen[0.0] == pytest.approx(0.2 / 25, abs=tol)
    assert seen[0.125] == pytest.approx(0.2 / 25 + (0.2 - 0.2 / 25) / 2, abs=tol)  # half-way up the warm-up
    assert seen[0.25] == pytest.approx(0.2, abs=tol)  # the peak
    assert seen[0.625] == pytest.approx(0.1, abs=tol)  # half-way down
    assert seen[1.0] == pytest.approx(0.2 / 25 / 1e4, abs=1e-6)  # the floor
    # the step-based OneCycleLR at the same fractions agrees
    steps = _lrs({k: v for k, v in cfg.items() if k != "progress"}, total=TIME_STEPS, lr=0.2)
    for t, lr in seen.items():
        assert lr == pytest.approx(steps[min(TIME_STEPS - 1, int(t * TIME_STEPS))], abs=tol)
    # nothing of the clock goes into the checkpoint
    assert sched.state_dict()["lr_lambdas"] == [None]


class _Strategy:
    def broadcast(self, obj):
        return obj


class _Trainer:
    def __init__(self, callbacks):
        self.callbacks, self.strategy = callbacks, _Strategy()


def test_budget_progress_reads_lightnings_timer_and_its_restored_offset():
    timer = Timer(duration="00:00:10:00")  # 600 s
    timer.load_state_dict({"time_elapsed": {"train": 150.0}})  # a resumed run had spent 150 s
    progress = budget_progress(_Trainer([timer]))
    assert progress() == pytest.approx(0.25)
    timer.load_state_dict({"time_elapsed": {"train": 900.0}})
    assert progress() == 1.0  # clamped: past the budget the schedule stays at its end


def test_time_budget_needs_max_time_and_fractional_warmup(tmp_path):
    with pytest.raises(ConfigError, match="trainer.max_time"):
        budget_progress(_Trainer([]))
    budget = ["++scheduler.progress=time", "trainer.max_time=00:00:10:00"]
    with pytest.raises(ConfigError, match="no length under a time budget"):
        validate_train_config(compose_cfg([*budget, "scheduler=cosine", "scheduler.warmup_epochs=1"], tmp_path))
    with pytest.raises(ConfigError, match="needs a wall-clock budget"):
        validate_train_config(
            compose_cfg(["++scheduler.progress=time", "scheduler=cosine", "scheduler.warmup_epochs=0"], tmp_path)
        )
    validate_train_config(compose_cfg(["scheduler=onecycle", *budget], tmp_path))  # warm-up as pct_start: fine


def test_an_unbounded_run_keeps_a_constant_lr_or_says_what_to_set():
    """max_epochs=-1 with only a time budget: Lightning estimates infinitely many steps."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert build_scheduler({"name": "none"}, opt, total_steps=math.inf, max_epochs=-1) is None
    with pytest.raises(ConfigError, match="scheduler.progress=time"):
        build_scheduler({"name": "cosine"}, opt, total_steps=math.inf, max_epochs=-1)


def test_ddp_ranks_share_rank_zeros_clock_with_a_broadcast_every_clock_every_steps():
    """Each rank's own clock differs; the LR must not. Rank 0's progress is broadcast every CLOCK_EVERY
    steps (a collective) and extrapolated from the step count in between, identically on every rank."""
    from resnet_cifar.training.optim import CLOCK_EVERY, SharedProgress

    clocks = {0: lambda step: 0.004 * step, 1: lambda step: 0.0047 * step + 0.01}  # rank 1 runs ahead
    broadcasts = []

    def broadcast_from_rank0(step):
        def broadcast(value):
            broadcasts.append(step)
            return clocks[0](step)  # what rank 0 sent

        return broadcast

    ranks = {}
    for r in (0, 1):
        ranks[r] = SharedProgress(clocks[r], None)
    seen = {0: [], 1: []}
    for step in range(200):
        for r, progress in ranks.items():
            progress.broadcast = broadcast_from_rank0(step)
            seen[r].append(progress(step))
    assert seen[0] == seen[1]  # the same LR on every rank
    assert len(broadcasts) == 2 * -(-200 // CLOCK_EVERY)  # per rank: once every CLOCK_EVERY steps
    # rank 0's clock is linear here, so the extrapolation is exact from the second broadcast on
    assert seen[0][CLOCK_EVERY:] == pytest.approx([0.004 * s for s in range(CLOCK_EVERY, 200)], abs=1e-9)
    assert seen[0][-1] <= 1.0


def test_one_process_reads_the_clock_at_every_step():
    timer = Timer(duration="00:00:10:00")
    progress = budget_progress(_Trainer([timer]))
    timer.load_state_dict({"time_elapsed": {"train": 300.0}})
    assert progress(7) == pytest.approx(0.5)
