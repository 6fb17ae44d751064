"""bench/gpu_check.py: the GPU check runs end to end on the CPU (``--smoke``), so a GPU window is spent measuring,
and comes back with every result it measured when a command fails or the check is killed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO

from resnet_cifar.training.precision import resolve_precision

STEPS = [
    "a. machine",
    "b. throughput",
    "c. gpu_3min",
    "d. eval, predict, export, DDP",
    "e. resnet20_he2016 (the time left)",
]


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_check

    return gpu_check


def test_gpu_check_smoke_with_a_failing_command_writes_every_other_row(synthetic_root, tmp_path):
    """One --smoke run with eval.py made to fail (a real failure: an override Hydra refuses): the commands after
    it still run, the failure is recorded with its stderr, and the steps run in the order of the docstring."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "RESNET_CIFAR_DATA": str(synthetic_root), "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, str(REPO / "bench" / "gpu_check.py"), str(out), "--smoke", "--work", str(work)]
    proc = subprocess.run([*cmd, "--fail", "eval"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())
    steps = results["steps"]
    assert sorted(steps) == STEPS
    started = [name for name, _ in results["order"]]
    assert started == [*STEPS[:3], "gpu_3min", STEPS[3], "eval", "predict", "export", "ddp_1gpu"] + [
        STEPS[4],
        "resnet20_he2016",
    ]
    # the injected failure: recorded with why and the end of its stderr; nothing else failed
    failed = {name: step.get("failed", step.get("error")) for name, step in steps.items() if not step["ok"]}
    assert failed == {STEPS[3]: ["eval"]}, failed
    evaluation = steps[STEPS[3]]["eval"]
    assert evaluation["returncode"] != 0 and "gpu_check_injected_failure" in evaluation["error"]
    assert 0 < len(evaluation["stderr_tail"]) <= 15 and "gpu_check_injected_failure" in evaluation["stderr_tail"][0]

    auto = resolve_precision("auto", "cpu")[0]
    assert steps["a. machine"]["auto_precision"] == auto
    # each throughput row ran in the precision its label names; no 16-mixed on a CPU (Lightning runs it as bf16)
    rows = steps["b. throughput"]["rows"]
    assert {(r["group"], r["kind"]) for r in rows} == {
        ("ResNet-20, batch 16, bf16-mixed", "bare loop"),
        ("ResNet-20, batch 16, bf16-mixed", "train.py"),
        ("ResNet-20, batch 16, bf16-mixed, host", "train.py"),
        ("ResNet-20, batch 16, bf16-mixed, compiled", "bare loop"),
        ("ResNet-20, batch 16, bf16-mixed, compiled", "train.py"),
    }
    for r in rows:
        assert r["ran_in"] == r["precision"] == "bf16-mixed" and r["cudnn_benchmark"] is False, r
        assert r["images_per_s"] > 0 and r["first_step_s"] > 0, r
    # gpu_3min ran over its (smoke) time budget of 20 s, then tested its final weights, kept as last.ckpt
    gpu_3min = steps["c. gpu_3min"]["gpu_3min"]
    assert gpu_3min["wall_clock_s"] >= 20 and gpu_3min["metrics"]["epochs"] >= 2
    assert gpu_3min["metrics"]["precision"] == auto and gpu_3min["metrics"]["best_ckpt"] == ""
    tools = steps[STEPS[3]]
    assert str(work / "gpu_3min" / "checkpoints" / "last.ckpt") in tools["predict"]["command"]
    assert tools["predict"]["predicted"] == 16
    assert any((work / "export").iterdir())
    assert tools["ddp_1gpu"]["metrics"]["epochs"] == 1 and tools["ddp_1gpu"]["metrics"]["precision"] == "32-true"
    he = steps[STEPS[4]]["resnet20_he2016"]
    assert he["ok"] and he["metrics"]["epochs"] == he["planned_epochs"] and he["metrics"]["precision"] == auto
    assert "compressed into 1 epoch" in he["schedule"]
    report = (out / "gpu_check.md").read_text()
    assert "| ResNet-20, batch 16, bf16-mixed: train.py |" in report and "--smoke" in report
    assert "| eval | `python eval.py" in report and "**failed**: eval.py exited with" in report
    assert "eval, the last lines of its stderr:" in report


def test_a_check_killed_midway_keeps_what_it_measured(gpu_check, tmp_path):
    """The results are written after every command: a check killed during a step returns that step's
    finished commands, and the step shows as not finished."""
    check = gpu_check.Check(tmp_path / "out", smoke=True, budget_s=60, work=tmp_path / "work")

    def fails():
        raise gpu_check.CommandFailed({"error": "train.py exited with 1: boom", "stderr_tail": ["boom"]})

    def step():
        check.command("first", lambda: {"wall_clock_s": 1.5})
        check.command("second", fails)
        check.command("third", lambda: {"wall_clock_s": 2.5})
        raise KeyboardInterrupt  # the window's end, before the step could finish

    with pytest.raises(KeyboardInterrupt):
        check.step("c. gpu_3min", step)
    saved = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["steps"]["c. gpu_3min"]
    assert saved["ok"] is None  # started, never finished
    assert saved["first"]["ok"] and saved["first"]["wall_clock_s"] == 1.5
    assert saved["second"] == {
        "ok": False,
        "error": "train.py exited with 1: boom",
        "stderr_tail": ["boom"],
        "seconds": saved["second"]["seconds"],
    }
    assert saved["third"]["ok"] and saved["third"]["wall_clock_s"] == 2.5
    assert "running or killed" in (tmp_path / "out" / "gpu_check.md").read_text()


def test_he2016_is_sized_from_the_time_left_less_a_reserve(gpu_check):
    # 15,000 images/s: 45,000 images + validation in 3.3 s per epoch
    epochs, train_s = gpu_check.he2016_plan(300.0, 15_000.0)
    assert train_s == 300.0 - gpu_check.RESERVE_S - gpu_check.TRAIN_OVERHEAD_S
    assert epochs == int(train_s / 3.3)
    assert gpu_check.he2016_plan(1e6, 15_000.0)[0] == gpu_check.HE2016_EPOCHS  # never more than the paper's
    assert gpu_check.he2016_plan(gpu_check.RESERVE_S + gpu_check.TRAIN_OVERHEAD_S + 3.0, 15_000.0) is None


def test_throughput_arms_on_a_gpu_say_what_they_run(gpu_check):
    """cudnn.benchmark set in every arm (Lightning keeps the process's setting otherwise), the ResNet-18 arms with
    it on as gpu_3min's trainer=gpu; 16-mixed on a GPU only."""
    arms = gpu_check.throughput_arms(smoke=False, accelerator="gpu")
    for arm in arms:
        on = "++trainer.benchmark=true" in arm["overrides"]
        assert on != ("++trainer.benchmark=false" in arm["overrides"]), arm
        assert on == arm["model"].startswith("ResNet-18") == ("cudnn.benchmark on" in arm["arm"]), arm
        assert f"trainer.precision={arm['precision']}" in arm["overrides"] and arm["precision"] in arm["arm"]
    assert {a["precision"] for a in arms} == {"bf16-mixed", "16-mixed"}
    assert {a["precision"] for a in gpu_check.throughput_arms(smoke=False, accelerator="cpu")} == {"bf16-mixed"}


def test_an_arm_stops_at_the_deadline(gpu_check, synthetic_root, tmp_path):
    from _common import compose

    overrides = ["data.strict_sizes=false", "data.val_size=100", "data.batch_size=16", "trainer.accelerator=cpu"]
    cfg = compose([f"data.root={synthetic_root}", *overrides, "trainer.precision=32-true", "module.compile=false"])
    with pytest.raises(gpu_check.ArmStopped, match="after 0 of 4 steps"):
        gpu_check.bare_loop(cfg, 2, 2, deadline=0.0)
    with pytest.raises(gpu_check.ArmStopped, match="after 1 of 4 steps"):
        gpu_check.train_py(cfg, 2, 2, deadline=0.0)
