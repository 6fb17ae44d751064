"""The wall-clock presets (``cpu_30min``, ``cpu_60min``) end inside their budget: the mechanism end to end, at a
small scale (a tiny ResNet-9 on the synthetic data, a 40-second budget instead of 27.5 minutes)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from helpers import compose_cfg, run_script, synthetic_overrides

BUDGET_S = 40
# What cpu_30min leaves outside trainer.max_time for start-up, the last validation, the test and the report:
# 30 minutes less its 27:30 (conf/experiment/cpu_30min.yaml). At this scale they take ~10-20 s; the reserve is
# the preset's own, so a loaded 2-core machine (CI runs two test workers) has ample margin.
RESERVE_S = 30 * 60 - 27.5 * 60
# How far past the budget training may stop: the Timer checks after each step (~0.05-0.5 s here), then the
# validation of the stopping epoch runs (100 images). 15 s covers both many times over on a loaded machine.
STOP_MARGIN_S = 15


def test_the_cpu_30min_mechanism_stops_inside_its_budget(synthetic_root, tmp_path):
    preset = compose_cfg(["experiment=cpu_30min"], tmp_path)
    assert preset.trainer.max_time == "00:00:27:30" and preset.scheduler.progress == "time"
    assert preset.trainer.max_epochs == -1  # the budget ends training
    overrides = [
        "experiment=cpu_30min",
        *synthetic_overrides(synthetic_root, precision=None),  # the preset's precision: auto
        "trainer.max_epochs=-1",  # as the preset (synthetic_overrides sets 2)
        f"trainer.max_time=00:00:00:{BUDGET_S}",
        "model.widths=[24,16,32,64]",  # tiny, but the whitening stem's 24 channels
        "logger=csv",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    start = time.monotonic()
    proc = run_script("train.py", *overrides, cwd=tmp_path, timeout=BUDGET_S + int(RESERVE_S) + 300)
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert "test/acc" in metrics and (run / "report" / "report.md").is_file()  # the test and report ran too

    # Training was stopped by the budget, inside it: Lightning's Timer, whose state last.ckpt keeps.
    assert "Time limit reached" in (run / "cpu_30min.log").read_text()  # the log is named after task_name
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    trained = last["callbacks"]["Timer"]["time_elapsed"]["train"]
    assert BUDGET_S <= trained <= BUDGET_S + STOP_MARGIN_S, trained
    assert metrics["epochs"] >= 2  # many steps ran: the schedule had a budget to spread over

    # The LR followed the clock to the schedule's end: the preset's straight line from optimizer.lr down to
    # min_lr_ratio * lr. At the stop it is at that floor, give or take the progress of the last step or two (a
    # schedule over steps, or a misread clock, would stop far from it).
    assert preset.scheduler.name == "linear" and preset.scheduler.warmup_epochs == 0
    peak = preset.optimizer.lr
    floor = peak * preset.scheduler.min_lr_ratio
    groups = {g["name"]: g["lr"] for g in last["optimizer_states"][0]["param_groups"]}
    assert groups["head"] == pytest.approx(floor, abs=0.05 * (peak - floor)), groups
    with (run / "csv" / "metrics.csv").open() as f:
        header, *rows = (line.rstrip("\n").split(",") for line in f)
    column = next(i for i, name in enumerate(header) if name.startswith("lr-") and name.endswith("/head"))
    lrs = [float(r[column]) for r in rows if r[column]]
    assert max(lrs) == pytest.approx(peak, rel=0.1)  # it started at the peak
    assert min(lrs) < 0.2 * peak  # and came down with the clock

    # The whole command, start-up, test and report included, ended within the budget plus the preset's reserve.
    assert wall <= BUDGET_S + RESERVE_S, wall
