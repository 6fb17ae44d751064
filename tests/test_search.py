"""The Optuna search (``hparams_search=optuna``, the project's sweeper in src/hydra_plugins): trials run as
jobs, a lagging trial is pruned through the storage, a killed search continues from its storage, a
submitit launch prunes in its own processes; and the settings' checks."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from helpers import REPO, TINY_JOB, probes_env, synthetic_overrides
from optuna.trial import TrialState

from hydra_plugins.resnet_cifar_optuna_sweeper._space import search_space
from resnet_cifar.errors import ConfigError
from resnet_cifar.study import make_pruner, open_storage

# Two epochs of two training steps (validations at steps 2 and 4), one validation batch: seconds per trial.
TINY = ["trainer.max_epochs=2", *TINY_JOB, "~callbacks.prediction_grid"]
# A crafted metric: trial n reports scores[n] at every validation; with the median pruner active from
# the second trial on, a trial below the completed ones' median at the same step is pruned there.
LAGGING = [
    "hydra.sweeper.pruner={_target_:optuna.pruners.MedianPruner,n_startup_trials:1}",
    "+callbacks.score._target_=probes.LogScore",
    "+callbacks.score.trial=${hydra:sweeper.trial}",
    "callbacks.trial_pruning.monitor=probe/score",
]


def search_command(sweep: Path, root: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, str(REPO / "train.py"), "hparams_search=optuna", f"hydra.sweep.dir={sweep}",
        *synthetic_overrides(root), *TINY, *overrides,
    ]  # fmt: skip


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=probes_env(), capture_output=True, text=True, timeout=900)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def trials(sweep: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="resnet_cifar", storage=f"sqlite:///{sweep / 'optuna.db'}").trials


def test_search_prunes_the_trial_that_lags(tmp_path, synthetic_root):
    """3 trials with scores 0.5, 0.25, 0.75: trial 1 lags and is pruned at its first validation (step 2);
    its run keeps its checkpoints and metrics, is not tested, and is pruned (not failed) everywhere."""
    sweep = tmp_path / "sweep"
    command = search_command(sweep, synthetic_root, "hydra.sweeper.n_trials=3", *LAGGING,
                             "+callbacks.score.scores=[0.5,0.25,0.75]", "test=true")  # fmt: skip
    r = run(command, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(3 jobs, 0 failed, 1 pruned)" in r.stdout

    study = trials(sweep)
    assert [t.state for t in study] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    assert [t.intermediate_values for t in study] == [{2: 0.5, 4: 0.5}, {2: 0.25}, {2: 0.75, 4: 0.75}]
    assert study[1].value == 0.25  # a pruned trial's value: its last report
    status = [read_json(sweep / str(n) / "status.json") for n in range(3)]
    assert [s["status"] for s in status] == ["completed", "pruned", "completed"]
    assert status[1]["pruned"] == "at step 2 by MedianPruner: probe/score 0.2500"
    metrics = [read_json(sweep / str(n) / "metrics.json") for n in range(3)]
    assert metrics[1]["epochs"] == 1 and "test/acc" not in metrics[1]  # stopped after epoch 1, not tested
    assert all(m["epochs"] == 2 and "test/acc" in m for m in (metrics[0], metrics[2]))
    assert (sweep / "1" / "checkpoints" / "last.ckpt").is_file()
    for t, m in zip(study, metrics):
        if t.state == TrialState.COMPLETE:
            assert t.value == pytest.approx(m["val/acc_best"])  # the job's return value, told by the sweeper
    summary = read_json(sweep / "sweep_status.json")
    assert (summary["n_failed"], summary["pruned"]) == (0, ["1"])

    # the search's report: the best trial's command, the trials table, Optuna's plots
    best = max((0, 2), key=lambda n: metrics[n]["val/acc_best"])
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_trial"] == best and result["best_value"] == pytest.approx(metrics[best]["val/acc_best"])
    args = shlex.split(result["command"])
    assert args[:2] == ["python", str(REPO / "train.py")]
    ran = yaml.safe_load((sweep / str(best) / ".hydra" / "overrides.yaml").read_text())  # as given, unresolved
    search_own = ("hparams_search=optuna", "callbacks.trial_pruning.monitor=probe/score")
    assert sorted(args[2:]) == sorted(a for a in ran if a not in search_own)
    assert {f"{k}={v}" for k, v in result["best_params"].items()} <= set(args)
    md = (sweep / "search.md").read_text()
    assert "3 trials: 2 complete, 1 pruned." in md and result["command"] in md
    assert "| 1 | pruned | 0.2500 | 2 |" in md
    for png in ("search_history.png", "search_importance.png", "search_intermediate.png"):
        assert (sweep / png).read_bytes()[:4] == b"\x89PNG", png
    # the command is ready: it composes the best trial's parameters as a single run
    shown = run([sys.executable, *args[1:], "--cfg", "job"], tmp_path)
    assert shown.returncode == 0, shown.stderr[-2000:]
    cfg = yaml.safe_load(shown.stdout)
    assert cfg["optimizer"]["lr"] == pytest.approx(result["best_params"]["optimizer.lr"])
    assert "trial_pruning" not in cfg["callbacks"]


def files_of(job: Path) -> dict[str, tuple[int, int]]:
    """A job's results (not Hydra's .hydra/ record nor its log): path -> (mtime, size)."""
    return {
        str(p.relative_to(job)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in job.rglob("*")
        if p.is_file() and p.parts[len(job.parts)] != ".hydra" and p.suffix != ".log"
    }


def test_killed_search_continues_from_its_storage(tmp_path, synthetic_root):
    """A 2-trial search is killed (SIGKILL) in trial 1; the same command fails that trial (its heartbeat
    stopped), keeps trial 0 as it was, and runs trial 2 in its place."""
    sweep, marker = tmp_path / "sweep", tmp_path / "held"
    command = search_command(
        sweep, synthetic_root, "hydra.sweeper.n_trials=2", "hydra.sweeper.heartbeat_interval=1",
        "+callbacks.hold._target_=probes.HoldAt", "+callbacks.hold.job=1", "+callbacks.hold.step=2",
        f"+callbacks.hold.marker={marker}",
    )  # fmt: skip
    first = subprocess.Popen(command, cwd=tmp_path, env=probes_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), first.stderr.read()[-3000:] if first.poll() is not None else "trial 1 never reached step 2"
    os.killpg(first.pid, signal.SIGKILL)
    assert first.wait(timeout=60) == -signal.SIGKILL
    assert [t.state for t in trials(sweep)] == [TrialState.COMPLETE, TrialState.RUNNING]
    assert read_json(sweep / "1" / "status.json")["status"] == "running"
    done_before = files_of(sweep / "0")

    # another study in this directory is refused before anything is written
    hydra_record = {p: p.read_bytes() for p in sweep.rglob(".hydra/*")}
    other = run([*command, "hydra.sweeper.study_name=other"], tmp_path)
    errors = [line for line in other.stderr.splitlines() if line.startswith("error: ")]
    assert other.returncode == 2 and len(errors) == 1 and "Traceback" not in other.stderr, other.stderr[-3000:]
    assert "holds an earlier sweep (the study 'resnet_cifar' in sqlite:///" in errors[0]
    assert {p: p.read_bytes() for p in sweep.rglob(".hydra/*")} == hydra_record

    again = run(command, tmp_path)
    assert again.returncode == 1 and "1 of 3 jobs failed (jobs 1)" in again.stderr, again.stderr[-3000:]
    study = trials(sweep)
    assert [t.state for t in study] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert files_of(sweep / "0") == done_before  # trial 0 kept as it was
    killed = read_json(sweep / "1" / "status.json")
    assert killed["status"] == "failed" and killed["error_type"] == "SearchStopped", killed
    assert "hparams_search=optuna" in killed["overrides"] and (sweep / "1" / "checkpoints" / "last.ckpt").is_file()
    assert read_json(sweep / "2" / "status.json")["status"] == "completed"
    # each validation's val/acc reached the trial: steps 2 and 4, the last one the run's final val/acc
    assert sorted(study[0].intermediate_values) == [2, 4]
    assert study[0].intermediate_values[4] == pytest.approx(read_json(sweep / "0" / "metrics.json")["val/acc"])
    assert "3 trials: 2 complete, 1 fail." in (sweep / "search.md").read_text()


def test_submitit_local_search_prunes_in_the_jobs_processes(tmp_path, synthetic_root):
    """Each trial in its own process (submitit's local executor, as SLURM would run it): the job finds
    its trial in the storage, and the lagging one is pruned."""
    sweep = tmp_path / "sweep"
    command = search_command(
        sweep, synthetic_root, "hydra.sweeper.n_trials=2", *LAGGING, "+callbacks.score.scores=[0.5,0.25]",
        "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1",
    )  # fmt: skip
    r = run(command, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [t.state for t in trials(sweep)] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert read_json(sweep / "1" / "status.json")["status"] == "pruned"
    logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2, "submitit ran no job processes"


def test_failed_trials_reach_optuna_as_the_worst_value(tmp_path, synthetic_root):
    """Every trial crashes: each returns failed_objective() (-inf when maximising) to the sweeper,
    Optuna records them as finished trials, the search runs to its end and the command exits 1."""
    sweep = tmp_path / "sweep"
    command = search_command(sweep, synthetic_root, "hydra.sweeper.n_trials=2",
                             "+callbacks.crash._target_=probes.CrashAt", "+callbacks.crash.step=1")  # fmt: skip
    r = run(command, tmp_path)
    assert r.returncode == 1 and "2 of 2 jobs failed" in r.stderr, r.stderr[-3000:]
    study = trials(sweep)
    assert [t.state for t in study] == [TrialState.COMPLETE] * 2
    assert [t.value for t in study] == [-math.inf, -math.inf]
    assert all(read_json(sweep / str(n) / "status.json")["error_type"] == "RuntimeError" for n in range(2))
    assert "No trial completed with a finite value." in (sweep / "search.md").read_text()


@pytest.mark.parametrize(
    "override, message",
    [
        ("hydra.sweeper.pruner=meadian", "expected median, hyperband, none, or a pruner's config with _target_"),
        ("hydra.sweeper.n_jobs=0", "must be >= 1"),
    ],
)
def test_a_bad_search_setting_is_one_line_before_any_trial(tmp_path, synthetic_root, override, message):
    sweep = tmp_path / "sweep"
    r = run(search_command(sweep, synthetic_root, override), tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == f"error: {override}: {message}".replace(": must", " must")
    assert not (sweep / "0").exists()


def test_search_space_from_hydra_sweep_syntax():
    space, fixed = search_space(
        ["optimizer.lr=tag(log, interval(0.01, 0.5))", "model=choice(resnet20,resnet32)",
         "data.batch_size=range(64,257,64)", "label_smoothing=interval(0.0, 0.2)", "hparams_search=optuna",
         "~callbacks.x", "+a.b=c", "optimizer.lr=tag(log, interval(0.02, 0.4))"]
    )  # fmt: skip
    D = optuna.distributions
    assert space == {
        "optimizer.lr": D.FloatDistribution(0.02, 0.4, log=True),  # the command line's replaces the config's
        "model": D.CategoricalDistribution(["resnet20", "resnet32"]),
        "data.batch_size": D.IntDistribution(64, 256, step=64),  # range's stop excluded, as Hydra has it
        "label_smoothing": D.FloatDistribution(0.0, 0.2),
    }
    assert fixed == ["hparams_search=optuna", "~callbacks.x", "+a.b=c"]  # passed to each trial as written


def test_pruner_and_storage_settings():
    assert isinstance(make_pruner("median"), optuna.pruners.MedianPruner)
    assert isinstance(make_pruner("hyperband"), optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner("none"), optuna.pruners.NopPruner)
    threshold = make_pruner({"_target_": "optuna.pruners.ThresholdPruner", "lower": 0.2})
    assert isinstance(threshold, optuna.pruners.ThresholdPruner)
    with pytest.raises(ConfigError, match="hydra.sweeper.pruner: optuna.samplers.RandomSampler is not an Optuna"):
        make_pruner({"_target_": "optuna.samplers.RandomSampler"})
    with pytest.raises(ConfigError, match="a search needs a database URL"):
        open_storage(None)
    with pytest.raises(ConfigError, match=r"hydra.sweeper.storage=postgresql://u:\*\*\*@h/db cannot be opened"):
        open_storage("postgresql://u:secret@h/db")  # no driver here; the password is not shown
