"""Sweeps: failing jobs do not stop the others, an Optuna search, the submitit launchers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import submitit
import yaml
from helpers import CONF, REPO, synthetic_overrides
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

# Two training steps, one validation batch: each job takes seconds.
TINY = [
    "trainer.max_epochs=1",
    "scheduler.warmup_epochs=0",
    "++trainer.limit_train_batches=2",
    "++trainer.limit_val_batches=1",
    "++trainer.num_sanity_val_steps=0",
    "test=false",
]


def run_train(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    """train.py as a user runs it, with tests/ on the path too (the probe callbacks)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")])}
    env.pop("RESNET_CIFAR_LOGS", None)
    cmd = [sys.executable, str(REPO / "train.py"), *overrides]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((d for d in sweep.iterdir() if d.name.isdigit()), key=lambda d: int(d.name))


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_multirun_with_failing_jobs_keeps_the_others(tmp_path, synthetic_root):
    """A bad value, a crash mid-run and a refused DDP job come first; the last job still runs."""
    cases = tmp_path / "extra" / "case"
    cases.mkdir(parents=True)
    (cases / "bad.yaml").write_text("# @package _global_\noptimizer:\n  lr: -1.0\n")
    (cases / "crash.yaml").write_text(
        "# @package _global_\ncallbacks:\n  crash:\n    _target_: probes.CrashAt\n    step: 1\n"
    )
    (cases / "ddp.yaml").write_text("# @package _global_\ndefaults:\n  - override /trainer: ddp_cpu\n")
    (cases / "ok.yaml").write_text("# @package _global_\n{}\n")
    sweep = tmp_path / "sweep"
    r = run_train(
        "-m",
        "+case=bad,crash,ddp,ok",
        f"hydra.searchpath=[file://{tmp_path / 'extra'}]",
        f"hydra.sweep.dir={sweep}",
        *synthetic_overrides(synthetic_root),
        *TINY,
        cwd=tmp_path,
    )
    assert r.returncode == 1, r.stderr[-3000:]
    assert "error: 3 of 4 jobs failed" in r.stderr

    bad, crash, ddp, ok = (read(d / "status.json") for d in job_dirs(sweep))
    assert bad["status"] == "failed" and bad["error_type"] == "ConfigError" and "optimizer.lr" in bad["error"]
    assert crash["status"] == "failed" and crash["error_type"] == "RuntimeError" and "simulated crash" in crash["error"]
    assert ddp["status"] == "failed" and "multirun" in ddp["error"] and "+case=ddp" in ddp["overrides"]
    assert ok["status"] == "completed"
    metrics = read(job_dirs(sweep)[3] / "metrics.json")
    assert 0 <= metrics["val/acc_best"] <= 1
    assert not any((d / "metrics.json").exists() for d in job_dirs(sweep)[:3])

    summary = read(sweep / "sweep_status.json")
    assert summary["n_jobs"] == 4 and summary["failed"] == ["0", "1", "2"]
    assert summary["jobs"][3]["val/acc_best"] == metrics["val/acc_best"]


def test_optuna_search_reports_best_trial(tmp_path, synthetic_root):
    sweep, db = tmp_path / "sweep", tmp_path / "optuna.db"
    r = run_train(
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        f"hydra.sweeper.storage=sqlite:///{db}",
        f"hydra.sweep.dir={sweep}",
        *synthetic_overrides(synthetic_root),
        *TINY,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = job_dirs(sweep)
    assert len(jobs) == 3
    val = {d.name: read(d / "metrics.json")["val/acc_best"] for d in jobs}
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(max(val.values()))
    best_job = max(val, key=val.get)
    best_overrides = read(sweep / best_job / "status.json")["overrides"]
    for key, value in result["best_params"].items():
        assert f"{key}={value}" in best_overrides
    assert set(result["best_params"]) == {
        "optimizer.lr",
        "optimizer.weight_decay",
        "label_smoothing",
        "stage.backbone_lr_ratio",
    }
    assert 0.01 <= result["best_params"]["optimizer.lr"] <= 0.5
    # The study lives in SQLite (SQLAlchemy < 2): 3 complete trials, resumable.
    study = optuna.load_study(study_name="resnet_cifar", storage=f"sqlite:///{db}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3


def test_failed_trials_reach_optuna_as_the_worst_value(tmp_path, synthetic_root):
    """Every trial crashes: each returns failed_objective() (-inf when maximising) to the sweeper,
    Optuna records them as finished trials, the search runs to its end and the command exits 1."""
    sweep, db = tmp_path / "sweep", tmp_path / "optuna.db"
    r = run_train(
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage=sqlite:///{db}",
        f"hydra.sweep.dir={sweep}",
        "+callbacks.crash._target_=probes.CrashAt",
        "+callbacks.crash.step=1",
        *synthetic_overrides(synthetic_root),
        *TINY,
        cwd=tmp_path,
    )
    assert r.returncode == 1 and "2 of 2 jobs failed" in r.stderr, r.stderr[-3000:]
    study = optuna.load_study(study_name="resnet_cifar", storage=f"sqlite:///{db}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert [t.value for t in study.trials] == [-math.inf, -math.inf]
    assert all(read(d / "status.json")["error_type"] == "RuntimeError" for d in job_dirs(sweep))


def test_submitit_local_launcher_runs_jobs(tmp_path, synthetic_root):
    sweep = tmp_path / "sweep"
    r = run_train(
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.cpus_per_task=1",
        "optimizer.lr=0.05",
        f"hydra.sweep.dir={sweep}",
        *synthetic_overrides(synthetic_root),
        *TINY,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = job_dirs(sweep)
    assert len(jobs) == 1  # one job keeps the test short; each job is its own process either way
    for d in jobs:
        assert read(d / "status.json")["status"] == "completed"
        assert 0 <= read(d / "metrics.json")["val/acc_best"] <= 1
    assert list((sweep / ".submitit").glob("*/*_log.out")), "submitit wrote no job logs"
    assert read(sweep / "sweep_status.json")["n_failed"] == 0


@pytest.mark.parametrize("num_nodes", [1, 2])
def test_slurm_launcher_config_becomes_sbatch_options(tmp_path, monkeypatch, num_nodes):
    """The composed hydra/launcher=slurm config through hydra_submitit_launcher's own SlurmLauncher
    (its parameter mapping, not a copy of it); submission is replaced by writing the sbatch text."""
    overrides = [
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.devices=4",
        f"trainer.num_nodes={num_nodes}",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=90",
        "hydra.launcher.mem_gb=32",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"hydra.launcher.submitit_folder={tmp_path / 'submitit'}",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # no srun here
    scripts = []

    def fake_map_array(executor, fn, *args):  # what would be submitted
        scripts.append(executor._executor._make_submission_file_text("python train.py", "uid"))
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", fake_map_array)
    assert launcher.launch([["optimizer.lr=0.1"]], initial_job_idx=0) == []
    (sbatch,) = scripts
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        f"#SBATCH --nodes={num_nodes}",
        "#SBATCH --time=90",
        "#SBATCH --mem=32GB",
    ):
        assert line in sbatch, sbatch
