"""bench/gpu_check.py: the GPU check runs end to end on the CPU (``--smoke``), so a GPU window is spent measuring."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO


def test_gpu_check_smoke_runs_every_step_and_writes_its_results(synthetic_root, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "RESNET_CIFAR_DATA": str(synthetic_root), "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), str(out), "--smoke", "--work", str(work)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())
    steps = results["steps"]
    assert list(steps) == ["a. machine", "b. throughput", "c. accuracy", "d. eval, predict, export, DDP"]
    failed = {name: step.get("error") for name, step in steps.items() if not step["ok"]}
    assert not failed, failed
    assert steps["a. machine"]["auto_precision"] in ("32-true", "bf16-mixed")
    rows = steps["b. throughput"]["rows"]
    kinds = {(r["group"], r["kind"]) for r in rows}
    for precision in ("bf16-mixed", "16-mixed"):
        for compiled in ("", ", compiled"):
            group = f"ResNet-20, batch 16, {precision}{compiled}"
            assert {(group, "bare loop"), (group, "train.py")} <= kinds, group
    assert all(r["images_per_s"] > 0 and "error" not in r for r in rows)
    accuracy = steps["c. accuracy"]
    assert accuracy["gpu_3min"]["returncode"] == 0 and 0 <= accuracy["gpu_3min"]["metrics"]["test/acc"] <= 1
    assert accuracy["resnet20_he2016"]["epochs_of_182"] == 1
    tools = steps["d. eval, predict, export, DDP"]
    assert tools["predict"]["predicted"] == 16
    assert tools["eval"]["metrics"]["test/acc"] >= 0 and tools["ddp_1gpu"]["metrics"]["epochs"] == 1
    assert (work / "export").is_dir() and any((work / "export").iterdir())
    report = (out / "gpu_check.md").read_text()
    assert "| ResNet-20, batch 16, bf16-mixed: train.py |" in report and "--smoke" in report
    assert "failed" not in report
