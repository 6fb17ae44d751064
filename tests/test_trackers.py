"""Experiment trackers: one run with `logger=[tensorboard,mlflow,wandb]`, read back by each tracker's reader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import compose_cfg, import_extra, run_script, synthetic_overrides

from resnet_cifar import cli

# Skipped without the extras, except under CI=true (helpers.import_extra): there a missing extra fails.
mlflow_tracking = import_extra("mlflow.tracking", "mlflow")
import_extra("wandb", "wandb")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# What Lightning logs during fit and test, and what metrics.json keeps of it.
LIGHTNING = ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/acc", "test/loss")
FIGURES = ("report/confusion_matrix", "report/reliability", "report/misclassified", "val/predictions")
TRACKER_ENV = ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY", "MLFLOW_TRACKING_URI")


@pytest.fixture(scope="module")
def tracked_run(synthetic_root, tmp_path_factory) -> Path:
    """One `python train.py 'logger=[tensorboard,mlflow,wandb]'` run, with the defaults (no tracker variables)."""
    run_dir = tmp_path_factory.mktemp("tracked")
    home = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as mp:
        for name in TRACKER_ENV:
            mp.delenv(name, raising=False)
        for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(name, str(home / name.lower()))  # nothing written to the user's ~/.cache or ~/.config
        proc = run_script(
            "train.py",
            *synthetic_overrides(synthetic_root),
            "logger=[tensorboard,mlflow,wandb]",
            "optimizer.lr=0.07",
            "trainer.limit_train_batches=3",
            f"hydra.run.dir={run_dir}",
            cwd=run_dir,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def lightning_and_report_metrics(run_dir: Path) -> dict[str, float]:
    """metrics.json as the trackers name it: Lightning's keys, and the report's test/* as report/*."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    expected = {k: metrics[k] for k in LIGHTNING}
    report = {k.replace("test/", "report/"): v for k, v in metrics.items() if k.startswith("test/")}
    report = {k: v for k, v in report.items() if k.replace("report/", "test/") not in LIGHTNING}
    assert "report/top1" in report and "report/ece" in report
    return {**expected, **report}


def test_mlflow_store_holds_the_final_metrics_params_and_figures(tracked_run, tmp_path):
    store = tracked_run / "logs" / "mlflow" / "mlflow.db"  # the default: <paths.log_dir>/mlflow, shared by every run
    assert store.is_file()
    client = mlflow_tracking.MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("train")  # task_name
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    for key, value in lightning_and_report_metrics(tracked_run).items():
        assert run.data.metrics[key] == pytest.approx(value, abs=1e-6), key
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 2  # one per epoch, not only the last
    assert run.data.params["optimizer.lr"] == "0.07" and run.data.params["model.name"] == "resnet20"
    assert run.data.tags["run_dir"] == str(tracked_run)
    for folder in ("report", "val"):
        client.download_artifacts(run.info.run_id, folder, str(tmp_path))
    for tag in FIGURES:
        (png,) = tmp_path.glob(f"{tag}_step*.png")
        assert png.read_bytes()[:8] == PNG_MAGIC, png


def wandb_cli(*args: str) -> str:
    """`wandb leet inspect`: W&B's own reader of a run's .wandb transaction log, offline."""
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_wandb_offline_run_holds_the_history_config_and_figures(tracked_run):
    (run_dir,) = (tracked_run / "wandb").glob("offline-run-*")  # offline by default, under the run dir
    state = json.loads(wandb_cli("--summary", "--json", str(run_dir)))
    assert state["state"] == "finished" and state["project"] == "train"
    for key, value in lightning_and_report_metrics(tracked_run).items():
        assert state["summary"][key] == pytest.approx(value, abs=1e-6), key
    records = [json.loads(line) for line in wandb_cli("--json", str(run_dir)).splitlines() if line.strip()]
    val_acc = [r["history"]["item"]["val/acc"] for r in records if "val/acc" in r.get("history", {}).get("item", {})]
    assert len(val_acc) == 2 and val_acc[-1] == pytest.approx(state["summary"]["val/acc"])
    assert state["config"]["optimizer.lr"] == 0.07 and state["config"]["run_dir"] == str(tracked_run)
    for tag in FIGURES:
        (name,) = state["summary"][tag]["filenames"]
        assert (run_dir / "files" / name).read_bytes()[:8] == PNG_MAGIC, tag


def test_tensorboard_gets_the_same_beside_the_trackers(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert set(FIGURES) <= set(acc.Tags()["images"])
    metrics = lightning_and_report_metrics(tracked_run)
    assert acc.Scalars("report/top1")[-1].value == pytest.approx(metrics["report/top1"], abs=1e-6)
    assert acc.Scalars("test/acc")[-1].value == pytest.approx(metrics["test/acc"], abs=1e-6)


def test_tracker_locations_follow_the_environment(tmp_path, monkeypatch):
    for name in TRACKER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RESNET_CIFAR_LOGS", "somewhere/logs")
    cfg = compose_cfg(["logger=[mlflow,wandb]", "run_name=named"], tmp_path)
    assert set(cfg.logger) == {"mlflow", "wandb"}
    assert cfg.logger.mlflow.tracking_uri == "sqlite:///somewhere/logs/mlflow/mlflow.db"
    assert cfg.logger.mlflow.run_name == cfg.logger.wandb.name == "named"
    assert cfg.logger.wandb.mode == "offline" and cfg.logger.wandb.save_dir == str(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = compose_cfg(["logger=[mlflow,wandb]"], tmp_path)
    assert cfg.logger.mlflow.tracking_uri == "http://tracking.example:5000"
    assert cfg.logger.wandb.mode == "disabled"


@pytest.mark.parametrize(
    "arg, choice, selected",
    [
        ("logger=mlflow", "logger=mlflow", True),
        ("logger=[tensorboard,mlflow]", "logger=mlflow", True),
        ("logger=[tensorboard, wandb]", "logger=wandb", True),
        ("logger=[tensorboard,csv]", "logger=mlflow", False),
        ("logger=mlflow_custom", "logger=mlflow", False),
        ("hparams_search=optuna", "hparams_search=", True),
        ("+hydra/launcher=slurm", "hydra/launcher=", True),
        ("hparams_search=null", "hparams_search=", False),
    ],
)
def test_which_overrides_select_an_extra(arg, choice, selected):
    assert cli.selects(arg, choice) is selected


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_tracker_that_is_not_installed_is_named(tracker, monkeypatch):
    """The real EXTRAS table, the list form of the choice; the module hidden (None in sys.modules fails its import)."""
    monkeypatch.setitem(sys.modules, tracker, None)
    message = cli.preflight([f"logger=[tensorboard,{tracker}]", "model=resnet20"])
    assert message == (
        f"logger=[tensorboard,{tracker}] needs {tracker}, which is not installed: pip install 'resnet-cifar[{tracker}]'"
    )
    assert cli.preflight(["logger=[tensorboard,csv]"]) is None


def test_finish_ends_the_wandb_run_so_the_next_run_does_not_join_it(tmp_path, monkeypatch):
    """In a multirun the jobs share one process: Lightning would reuse an open ``wandb.run``."""
    import wandb
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    from resnet_cifar import trackers

    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    loggers = [CSVLogger(tmp_path), WandbLogger(save_dir=str(tmp_path), mode="offline", project="t")]
    loggers[1].log_metrics({"x": 1.0}, step=0)
    assert wandb.run is not None
    trackers.finish(loggers)
    assert wandb.run is None
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert json.loads(wandb_cli("--summary", "--json", str(run_dir)))["state"] == "finished"
