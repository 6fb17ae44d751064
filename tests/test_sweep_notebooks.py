"""Sweep summary after a two-run multirun, and the notebooks executed headless."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, run_script, synthetic_overrides

from resnet_cifar.sweeps import load_runs, summarize

LRS = ("0.02", "0.2")


@pytest.fixture(scope="module")
def sweep_dir(synthetic_root, tmp_path_factory) -> Path:
    """``train.py -m optimizer.lr=0.02,0.2`` (1 epoch, 4 steps each) on synthetic data, summarised by the callback."""
    tmp = tmp_path_factory.mktemp("sweep")
    sweep = tmp / "multirun"
    res = run_script(
        "train.py",
        "-m",
        f"optimizer.lr={','.join(LRS)}",
        *synthetic_overrides(synthetic_root),
        "trainer.max_epochs=1",
        "data.batch_size=100",
        "test=false",
        "~callbacks.prediction_grid",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp,
        timeout=1800,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return sweep


def test_multirun_writes_sorted_summary(sweep_dir):
    for name in ("summary.csv", "summary.md", "summary.png"):
        assert (sweep_dir / name).is_file(), name
    assert (sweep_dir / "summary.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((sweep_dir / "summary.csv").read_text().splitlines()))
    assert sorted(r["optimizer.lr"] for r in rows) == sorted(LRS)
    assert [r["status"] for r in rows] == ["completed", "completed"]
    for r in rows:  # the table holds each job's own final metrics
        metrics = json.loads((sweep_dir / r["job"] / "metrics.json").read_text())
        assert float(r["val/acc_best"]) == pytest.approx(metrics["val/acc_best"])
    values = [float(r["val/acc_best"]) for r in rows]
    assert values == sorted(values, reverse=True)
    assert "| job | status | optimizer.lr | val/acc_best" in (sweep_dir / "summary.md").read_text()


def test_summary_marks_failed_jobs(sweep_dir, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep_dir, copy)
    for name in ("summary.csv", "summary.md", "summary.png"):
        (copy / name).unlink()
    crashed = copy / "2" / ".hydra"  # a job that never wrote metrics.json
    crashed.mkdir(parents=True)
    (crashed / "overrides.yaml").write_text("- optimizer.lr=1.0\n")
    res = subprocess.run(
        [sys.executable, "-m", "resnet_cifar.sweeps", str(copy)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader((copy / "summary.csv").read_text().splitlines()))
    assert [r["status"] for r in rows] == ["completed", "completed", "unknown"]  # no status.json
    assert rows[-1]["optimizer.lr"] == "1.0" and rows[-1]["val/acc_best"] == ""
    assert "| 2 | unknown | 1.0 |" in res.stdout
    assert summarize(copy)["failed"] == ["2"]


def test_summary_cli_error_on_missing_dir(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "resnet_cifar.sweeps", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert res.returncode == 2 and res.stderr.startswith("error: sweep directory")
    assert load_runs(tmp_path) == []


def execute_notebook(name: str, env: dict[str, str], tmp_path: Path) -> list[str]:
    """Run ``notebooks/<name>`` top to bottom in a fresh kernel; return its stdout texts."""
    import nbformat  # the dev extra: a missing one is an error, not a skip
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    old = dict(os.environ)
    os.environ.update({"PYTHONPATH": str(REPO / "src"), "MPLBACKEND": "Agg", **env})
    try:
        NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    return [
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("name") == "stdout"
    ]


def test_lr_sweep_notebook_executes(sweep_dir, tmp_path):
    out = "".join(execute_notebook("lr_sweep_analysis.ipynb", {"SWEEP_DIR": str(sweep_dir)}, tmp_path))
    assert "best: {'optimizer.lr':" in out
    assert "6 curves" in out  # train/loss, val/acc, val/loss of both runs


def test_data_notebook_executes_and_matches_normalisation(real_root, tmp_path):
    out = "".join(execute_notebook("data_exploration.ipynb", {"RESNET_CIFAR_DATA": str(real_root)}, tmp_path))
    assert "50000 training and 10000 test images" in out
    assert "the normalisation constants match the training data" in out
