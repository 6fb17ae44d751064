"""Progress on stderr where a user waits: shown on a terminal or when forced, never otherwise.

``RESNET_CIFAR_PROGRESS`` (``resnet_cifar.progress``) is the one switch: ``1`` forces the bars
on (here, into pytest's captured stderr), ``0`` turns them off, ``auto`` shows them only when
stderr is a terminal (pytest's capture is not one).
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import compose_cfg, synthetic_overrides
from omegaconf import OmegaConf
from PIL import Image

from resnet_cifar import sweeps
from resnet_cifar.data import cifar10
from resnet_cifar.errors import ConfigError, DataError
from resnet_cifar.inference import predict
from resnet_cifar.progress import ENV, show_progress, trainer_progress
from resnet_cifar.run import evaluate, train
from resnet_cifar.training.module import ImageClassifier

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_the_switch(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert show_progress(Terminal()) and not show_progress(io.StringIO())  # auto: only on a terminal
    for value, expected in (("1", True), ("on", True), ("0", False), ("off", False), ("auto", False)):
        monkeypatch.setenv(ENV, value)
        assert show_progress(io.StringIO()) is expected, value
    monkeypatch.setenv(ENV, "0")
    assert not show_progress(Terminal())
    monkeypatch.setenv(ENV, "sometimes")
    with pytest.raises(ConfigError, match=f"{ENV}='sometimes' must be 1"):
        show_progress()


def test_lightning_bar_follows_the_switch(monkeypatch):
    from pytorch_lightning.callbacks import ModelSummary, TQDMProgressBar

    callbacks = [TQDMProgressBar(), ModelSummary()]
    monkeypatch.setenv(ENV, "1")
    assert trainer_progress({}, callbacks) == {"callbacks": callbacks}
    off = {"callbacks": callbacks[1:], "enable_progress_bar": False}
    assert trainer_progress({"enable_progress_bar": False}, callbacks) == off
    monkeypatch.setenv(ENV, "0")
    assert trainer_progress({}, callbacks) == off


class BarSpy(pl.Callback):
    """Records what the progress bar holds after each training step."""

    seen: list[dict] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        BarSpy.seen.append(dict(trainer.progress_bar_metrics))


def test_training_bar_shows_the_loss_without_a_per_step_progress_bar_metric(
    synthetic_root, tmp_path, capsys, monkeypatch
):
    """The loss on the bar is read at its redraws; a prog_bar=True step value would be turned into a
    Python number after every step by Lightning (a host sync per step on a GPU)."""
    monkeypatch.setenv(ENV, "1")
    overrides = [o for o in synthetic_overrides(synthetic_root) if o != "~callbacks.progress_bar"]
    overrides += ["trainer.max_epochs=1", "callbacks.progress_bar.refresh_rate=1", "report=none", "logger=none"]
    overrides += ["+callbacks.spy._target_=test_progress.BarSpy"]
    BarSpy.seen.clear()
    capsys.readouterr()
    train(compose_cfg(overrides, tmp_path))
    out, err = capsys.readouterr()
    assert "loss=" in err and "Epoch 0" in err, err[-2000:]  # on stderr, as every bar of the project
    assert "Epoch 0" not in out and "it/s" not in out and "Validation" not in out, out[-2000:]
    assert len(BarSpy.seen) == 8 and not any("train/loss" in m for m in BarSpy.seen)  # 400 images / 50


# --------------------------------------------------------------------------- predict
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """An untrained ResNet-20 saved as a training checkpoint (the keys ``load_trained`` reads)."""
    module = ImageClassifier(
        model={"name": "resnet20"}, optimizer={"name": "sgd", "lr": 0.1}, scheduler={"name": "none"}
    )
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    # the synthetic CIFAR-10's sizes (helpers.synthetic_overrides), for export's check on its test images
    data_hp = {"mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32, "strict_sizes": False, "val_size": 100}
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    torch.save({**ckpt, "datamodule_hyper_parameters": data_hp}, path)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        Image.new("RGB", (40, 32), (40 * i, 100, 200)).save(images / f"img{i}.png")
    (images / "notes.txt").write_text("not an image")
    return images


def run_predict(ckpt: Path, folder: Path, tmp_path: Path, capsys) -> str:
    cfg = compose_cfg([f"ckpt_path={ckpt}", f"inputs={folder}", f"output={tmp_path / 'p.csv'}"], tmp_path, "predict")
    capsys.readouterr()
    result = predict(cfg)
    assert len(result.predictions) == 5 and len(result.skipped) == 1
    return capsys.readouterr().err


def test_predict_over_a_folder_shows_progress_when_forced(ckpt, folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(ENV, "1")
    err = run_predict(ckpt, folder, tmp_path, capsys)
    assert "predict: 100%" in err and "6/6" in err and "image/s" in err, err


@pytest.mark.parametrize("value", ["0", "auto"])
def test_predict_is_quiet_when_off_or_not_a_terminal(ckpt, folder, tmp_path, capsys, monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    err = run_predict(ckpt, folder, tmp_path, capsys)
    assert "predict:" not in err and "%|" not in err and "image/s" not in err, err


def test_predict_shows_progress_on_a_terminal(ckpt, folder, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    cfg = compose_cfg([f"ckpt_path={ckpt}", f"inputs={folder}", f"output={tmp_path / 'p.csv'}"], tmp_path, "predict")
    predict(cfg)
    assert "predict: 100%" in terminal.getvalue()


def test_export_and_its_check_show_progress(ckpt, synthetic_root, tmp_path, capsys, monkeypatch):
    from resnet_cifar.export import export

    cfg = compose_cfg(
        [f"ckpt_path={ckpt}", f"data.root={synthetic_root}", "check_images=20", "formats=[safetensors]"],
        tmp_path,
        "export",
    )
    monkeypatch.setenv(ENV, "1")
    capsys.readouterr()
    assert export(cfg)["checks"]["safetensors"]["max_abs_diff"] < 1e-4
    err = capsys.readouterr().err
    assert "export: 100%" in err and "1/1" in err and "check: 100%" in err and "2/2" in err, err
    monkeypatch.setenv(ENV, "0")
    export(cfg)
    err = capsys.readouterr().err
    assert "export:" not in err and "check:" not in err, err


# --------------------------------------------------------------------------- CIFAR-10 download
@pytest.fixture
def archive_url(synthetic_root, tmp_path, monkeypatch) -> Path:
    """The synthetic CIFAR-10 packed like the official archive, served from a file:// URL."""
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(synthetic_root / cifar10.FOLDER, arcname=cifar10.FOLDER)
    monkeypatch.setattr(cifar10, "URL", archive.as_uri())
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    return archive


def test_cifar_download_unpacks_and_shows_progress_when_forced(archive_url, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(ENV, "1")
    folder = cifar10.ensure_dataset(tmp_path / "forced")
    assert not cifar10.missing_files(tmp_path / "forced") and folder.name == cifar10.FOLDER
    assert not list((tmp_path / "forced").glob("*.tar.gz"))  # the archive is removed once unpacked
    assert "100%" in capsys.readouterr().err
    monkeypatch.setenv(ENV, "0")
    cifar10.ensure_dataset(tmp_path / "quiet")
    assert "%" not in capsys.readouterr().err and not cifar10.missing_files(tmp_path / "quiet")


def test_cifar_download_with_a_wrong_checksum_is_deleted(archive_url, tmp_path, monkeypatch):
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", "0" * 32)
    with pytest.raises(DataError, match="is corrupted .* and was deleted"):
        cifar10.ensure_dataset(tmp_path / "bad")
    assert not list((tmp_path / "bad").glob("*.tar.gz")) and cifar10.missing_files(tmp_path / "bad")


# --------------------------------------------------------------------------- sweeps
def sweep_dir(tmp_path: Path, statuses: list[str | None], task: list[str]) -> Path:
    """A multirun directory as Hydra and the jobs leave it: multirun.yaml, one folder per job."""
    sweep = tmp_path / "sweep"
    for num, status in enumerate(statuses):
        job = sweep / str(num)
        (job / ".hydra").mkdir(parents=True)
        if status:
            (job / "status.json").write_text(json.dumps({"status": status, "overrides": [], "job": num}))
    config = {"hydra": {"sweeper": {"_target_": BASIC_SWEEPER, "params": None}, "overrides": {"task": task}}}
    OmegaConf.save(config, sweep / "multirun.yaml")
    return sweep


def test_planned_jobs_counts_the_grid_and_the_trials():
    def config(sweeper: dict, task: list[str]):
        return OmegaConf.create({"hydra": {"sweeper": sweeper, "overrides": {"task": task}}})

    basic = {"_target_": BASIC_SWEEPER, "params": {"seed": "1,2,3"}}
    assert sweeps.planned_jobs(config(basic, ["optimizer.lr=0.1,0.2", "model=resnet20"])) == 6
    assert sweeps.planned_jobs(config({**basic, "params": None}, ["optimizer.lr=0.1,0.2"])) == 2
    optuna = {"_target_": "hydra_plugins.resnet_cifar_optuna_sweeper.optuna_sweeper.OptunaSweeper", "n_trials": 30}
    assert sweeps.planned_jobs(config(optuna, [])) == 30
    assert sweeps.planned_jobs(config({"_target_": "some.OtherSweeper"}, [])) is None


def test_sweep_report_prints_a_status_line_after_each_job(tmp_path, capsys, monkeypatch):
    sweep = sweep_dir(tmp_path, ["completed", "failed", "completed"], ["optimizer.lr=0.1,0.2,0.3,0.4,0.5"])
    report = sweeps.SweepReport()
    report.on_multirun_start(OmegaConf.load(sweep / "multirun.yaml"))
    monkeypatch.setattr(sweeps.report, "in_multirun", lambda: True)
    job_config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    monkeypatch.setenv(ENV, "1")
    report.on_job_end(job_config, job_return=None)
    assert capsys.readouterr().err == "sweep: 3/5 done, 1 failed\n"
    (sweep / "3" / ".hydra").mkdir(parents=True)  # a job under way in a parallel launcher
    report.on_job_end(job_config, job_return=None)
    assert capsys.readouterr().err == "sweep: 3/5 done, 1 failed, 1 running\n"
    for value in ("0", "auto"):
        monkeypatch.setenv(ENV, value)
        report.on_job_end(job_config, job_return=None)
        assert capsys.readouterr().err == ""


def test_sweep_summary_command_says_where_the_sweep_stands(tmp_path, capsys, monkeypatch):
    # the command expands a glob with the package's configs: every cpu_* preset x 2 seeds
    presets = len(list((Path(__file__).parents[1] / "conf" / "experiment").glob("cpu_*.yaml")))
    assert presets >= 2
    sweep = sweep_dir(tmp_path, ["completed", "terminated", None], ["experiment=glob(cpu_*)", "seed=1,2"])
    monkeypatch.setenv(ENV, "1")
    assert sweeps.main([str(sweep)]) == 0
    out = capsys.readouterr()
    assert out.err == f"sweep: 2/{2 * presets} done, 1 failed, 1 running or killed\n" and "| job | status |" in out.out
    monkeypatch.setenv(ENV, "auto")
    assert sweeps.main([str(sweep)]) == 0
    assert capsys.readouterr().err == ""


def test_eval_bar_goes_to_stderr(ckpt, synthetic_root, tmp_path, capsys, monkeypatch):
    """eval.py's test bar is on stderr with the training bars; stdout keeps the results."""
    monkeypatch.setenv(ENV, "1")
    overrides = [f"ckpt_path={ckpt}", f"data.root={synthetic_root}", "trainer.precision=32-true", "report=none"]
    capsys.readouterr()
    evaluate(compose_cfg([*overrides, "trainer.accelerator=cpu"], tmp_path, "eval"))
    out, err = capsys.readouterr()
    assert "Testing" in err, err[-2000:]
    assert "Testing" not in out and "it/s" not in out, out[-2000:]
