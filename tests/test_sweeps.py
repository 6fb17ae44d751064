"""Sweeps: failing jobs do not stop the others, a killed sweep continues, cross-validation over folds,
the submitit launchers (the Optuna search: test_search.py)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import yaml
from helpers import CONF, REPO, TINY_JOB, probes_env, synthetic_overrides
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from resnet_cifar import sweeps
from resnet_cifar.models.weights import safe_load

# Two training steps, one validation batch: each job takes seconds.
TINY = ["trainer.max_epochs=1", *TINY_JOB]


def run_train(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    """train.py as a user runs it, with tests/ on the path too (the probe callbacks)."""
    cmd = [sys.executable, str(REPO / "train.py"), *overrides]
    return subprocess.run(cmd, cwd=cwd, env=probes_env(), capture_output=True, text=True, timeout=900)


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
    # the survivor's results are all there (its metrics and checkpoints), the failed jobs' are not
    metrics = read(job_dirs(sweep)[3] / "metrics.json")
    assert math.isfinite(metrics["val/acc_best"]) and metrics["val/acc_best"] == metrics["val/acc"]  # one validation
    assert list((job_dirs(sweep)[3] / "checkpoints").glob("*.ckpt"))
    assert not any((d / "metrics.json").exists() for d in job_dirs(sweep)[:3])

    summary = read(sweep / "sweep_status.json")
    assert summary["n_jobs"] == 4 and summary["failed"] == ["0", "1", "2"]
    assert summary["jobs"][3]["val/acc_best"] == metrics["val/acc_best"]
    assert not any(job.get("val/acc_best") is not None for job in summary["jobs"][:3]), summary["jobs"][:3]


def files_of(job: Path) -> dict[str, tuple[int, int]]:
    """A job's results (everything but Hydra's ``.hydra/`` record and the log it appends to): path -> (mtime, size)."""
    return {
        str(p.relative_to(job)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in job.rglob("*")
        if p.is_file() and p.parts[len(job.parts)] != ".hydra" and p.suffix != ".log"
    }


def test_killed_multirun_continues_where_it_stopped(tmp_path, synthetic_root):
    """A 4-job cross-validation sweep (2 folds x 2 LRs) is killed (SIGKILL) in its second job; the same
    command again skips job 0, resumes job 1 from its last.ckpt, runs jobs 2 and 3, and reports all 4."""
    sweep, marker = tmp_path / "sweep", tmp_path / "held"
    command = [
        sys.executable,
        str(REPO / "train.py"),
        "-m",
        "data.num_folds=2",
        "data.fold=0,1",
        "optimizer.lr=0.05,0.1",
        f"hydra.sweep.dir={sweep}",
        *synthetic_overrides(synthetic_root),
        "trainer.max_epochs=1",
        "scheduler=cosine",
        "scheduler.warmup_epochs=0",
        "++trainer.limit_train_batches=4",  # 4 steps of 50 images
        "++trainer.num_sanity_val_steps=0",
        "test=false",
        "~callbacks.prediction_grid",
        "callbacks.last_checkpoint.every_n_train_steps=1",
        "+callbacks.hold._target_=probes.HoldAt",  # job 1 waits before its step 3 (once)
        "+callbacks.hold.job=1",
        "+callbacks.hold.step=2",
        f"+callbacks.hold.marker={marker}",
    ]
    first = subprocess.Popen(
        command, cwd=tmp_path, env=probes_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), first.stderr.read()[-3000:] if first.poll() is not None else "job 1 never reached step 2"
    os.killpg(first.pid, signal.SIGKILL)
    assert first.wait(timeout=60) == -signal.SIGKILL

    jobs = job_dirs(sweep)
    assert [read(d / "status.json")["status"] for d in jobs] == ["completed", "running"]
    done_before = files_of(jobs[0])
    last = jobs[1] / "checkpoints" / "last.ckpt"
    assert safe_load(last)["global_step"] == 2
    events_before = set((jobs[1] / "tensorboard").glob("events.out.tfevents.*"))

    again = subprocess.run(command, cwd=tmp_path, env=probes_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 of its jobs completed earlier and are skipped; 1 run again" in again.stdout + again.stderr
    jobs = job_dirs(sweep)
    assert [read(d / "status.json")["status"] for d in jobs] == ["completed"] * 4
    # job 0: not trained again, its results untouched
    assert files_of(jobs[0]) == done_before
    assert "Job 0 completed in an earlier run of this sweep: skipped" in (jobs[0] / "train.log").read_text()
    # job 1: resumed from its step-2 checkpoint; the rerun trained steps 3 and 4 only
    assert read(jobs[1] / "status.json")["resumed_from"] == str(last)
    assert f"Job 1 (running in an earlier run of this sweep) resumes from {last}" in (jobs[1] / "train.log").read_text()
    assert safe_load(last)["global_step"] == 4
    (events,) = set((jobs[1] / "tensorboard").glob("events.out.tfevents.*")) - events_before
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 3]  # Lightning logs step k+1 at global_step k
    assert "resumed_from" not in read(jobs[2] / "status.json")

    # the summary covers all 4 jobs, and the 2 folds of each LR: mean and sample std of their metrics
    summary = read(sweep / "sweep_status.json")
    assert summary["n_jobs"] == 4 and summary["n_failed"] == 0
    val = {(j["overrides"]["data.fold"], j["overrides"]["optimizer.lr"]): j["val/acc_best"] for j in summary["jobs"]}
    assert len(val) == 4
    for row in summary["folds"]:
        lr = row["overrides"]["optimizer.lr"]
        a, b = val[(0, lr)], val[(1, lr)]
        assert row["folds"] == [0, 1] and row["n_jobs"] == 2
        assert row["mean"]["val/acc_best"] == pytest.approx((a + b) / 2)
        assert row["std"]["val/acc_best"] == pytest.approx(abs(a - b) / math.sqrt(2))
    assert sorted(row["overrides"]["optimizer.lr"] for row in summary["folds"]) == [0.05, 0.1]
    assert "## Over the folds (data.fold)" in (sweep / "summary.md").read_text()

    # another command in the same directory is refused before anything is written
    hydra_record = {p: p.read_bytes() for p in sweep.rglob(".hydra/*")}
    other = run_train(*[a.replace("optimizer.lr=0.05,0.1", "optimizer.lr=0.05,0.2") for a in command[2:]], cwd=tmp_path)
    errors = [line for line in other.stderr.splitlines() if line.startswith("error: ")]
    assert other.returncode == 2 and len(errors) == 1 and "Traceback" not in other.stderr, other.stderr[-3000:]
    assert f"hydra.sweep.dir={sweep} holds an earlier sweep: its job 1 ran optimizer.lr=0.1" in errors[0]
    assert {p: p.read_bytes() for p in sweep.rglob(".hydra/*")} == hydra_record


def fake_job(sweep: Path, num: int, overrides: list[str], status: str, metrics: dict | None = None) -> Path:
    """A job directory as a multirun leaves it: .hydra/overrides.yaml, status.json, metrics.json."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "status.json").write_text(json.dumps({"status": status, "overrides": overrides, "job": num}))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    return job


def test_fold_summary_mean_and_sample_std_per_setting(tmp_path):
    """3 folds x 2 learning rates, one fold failed: one row per learning rate, over its completed folds."""
    sweep = tmp_path / "sweep"
    values = {"0.1": [0.80, 0.82, 0.84], "0.2": [0.70, 0.76, None]}  # None: that fold failed
    num = 0
    for lr, accs in values.items():
        for fold, acc in enumerate(accs):
            metrics = None if acc is None else {"val/acc_best": acc, "test/acc": acc - 0.01, "best_ckpt": "x.ckpt"}
            fake_job(sweep, num, [f"optimizer.lr={lr}", f"data.fold={fold}", "data.num_folds=3"],
                     "failed" if acc is None else "completed", metrics)  # fmt: skip
            num += 1
    summary = sweeps.summarize(sweep)
    best, other = summary["folds"]
    assert best["overrides"] == {"optimizer.lr": 0.1} and best["folds"] == [0, 1, 2] and best["n_jobs"] == 3
    assert best["mean"]["val/acc_best"] == pytest.approx(0.82)
    assert best["std"]["val/acc_best"] == pytest.approx(0.02)  # sample std (n-1): sqrt((0.02² + 0 + 0.02²) / 2)
    assert best["mean"]["test/acc"] == pytest.approx(0.81)
    assert other["overrides"] == {"optimizer.lr": 0.2} and other["folds"] == [0, 1] and other["n_jobs"] == 3
    assert other["mean"]["val/acc_best"] == pytest.approx(0.73)
    assert other["std"]["val/acc_best"] == pytest.approx(0.06 / math.sqrt(2))
    md = (sweep / "summary.md").read_text()
    assert "| optimizer.lr | folds | val/acc_best | test/acc |" in md
    assert "| 0.1 | 3/3 | 0.8200 ± 0.0200 | 0.8100 ± 0.0200 |" in md
    assert "| 0.2 | 2/3 | 0.7300 ± 0.0424 | 0.7200 ± 0.0424 |" in md
    rows = list(csv.DictReader((sweep / "summary_folds.csv").read_text().splitlines()))
    got = [(r["optimizer.lr"], r["folds_completed"], r["jobs"]) for r in rows]
    assert got == [("0.1", "3", "3"), ("0.2", "2", "3")]
    assert float(rows[0]["val/acc_best_mean"]) == pytest.approx(0.82)
    assert float(rows[0]["val/acc_best_std"]) == pytest.approx(0.02)
    # one fold alone has no spread; a sweep that does not vary data.fold has no fold table
    (sweep / "5" / "status.json").unlink()
    (sweep / "4" / "status.json").write_text(json.dumps({"status": "failed"}))
    assert sweeps.summarize(sweep)["folds"][1]["std"]["val/acc_best"] is None
    for d in ("1", "2", "4", "5"):
        shutil.rmtree(sweep / d)
    assert "folds" not in sweeps.summarize(sweep) and "Over the folds" not in (sweep / "summary.md").read_text()


def test_a_job_directory_of_another_sweep_is_refused(tmp_path):
    """Job by job (any sweeper): a directory whose status.json records other overrides is not this job's."""
    job = fake_job(tmp_path / "sweep", 0, ["optimizer.lr=0.1", "seed=1"], "completed", {"val/acc_best": 0.5})
    earlier = sweeps.earlier_attempt(job, ["seed=1", "optimizer.lr=0.1"])  # the order does not matter
    assert earlier == sweeps.EarlierAttempt(status="completed", metrics={"val/acc_best": 0.5})
    with pytest.raises(sweeps.SweepConflict, match="holds another job .*optimizer.lr=0.1 seed=1.* than this sweep's"):
        sweeps.earlier_attempt(job, ["optimizer.lr=0.2", "seed=1"])
    assert sweeps.earlier_attempt(tmp_path / "sweep" / "1", ["optimizer.lr=0.2"]) is None  # a new job
    # an Optuna search continues its own study only (its trials add directories), never another sweep
    sweeper = {"_target_": "x.OptunaSweeper", "study_name": "s", "storage": "sqlite:///${hydra.sweep.dir}/o.db"}
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}, "sweeper": sweeper}})
    assert "(not an Optuna search of this version), not this search's study 's'" in sweeps.resume_conflict(config)
    sweeps.resume.record_study(tmp_path / "sweep", "s", f"sqlite:///{tmp_path / 'sweep'}/o.db")
    assert sweeps.resume_conflict(config) is None
    config.hydra.sweeper.study_name = "t"
    assert "(the study 's' in sqlite:///" in sweeps.resume_conflict(config)
    config.hydra.sweep.dir = str(tmp_path / "new")
    assert sweeps.resume_conflict(config) is None


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
