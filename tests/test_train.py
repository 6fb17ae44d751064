"""train.py and eval.py end to end, as a user runs them, on the synthetic data set."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from helpers import compose_cfg, run_script, synthetic_overrides
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from resnet_cifar.config import validate_train_config
from resnet_cifar.errors import ConfigError
from resnet_cifar.run import objective, train

# Test accuracy a 2-epoch run on the synthetic set must reach: 3x chance (0.1), so a training path
# that does not learn (or a test set unlike the training set) fails.
LEARNED = 0.3
STEPS_PER_EPOCH = 8  # 400 training images (500 less 100 for validation) in batches of 50


@pytest.fixture(scope="module")
def trained_run(synthetic_root, tmp_path_factory) -> Path:
    """One real `python train.py` run whose outputs several tests inspect."""
    run_dir = tmp_path_factory.mktemp("run")
    proc = run_script("train.py", *synthetic_overrides(synthetic_root), f"hydra.run.dir={run_dir}", cwd=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_train_writes_checkpoints_metrics_and_logs(trained_run, synthetic_root):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for key in ("train/loss", "val/acc", "val/acc_best", "test/acc", "test/loss"):
        assert key in metrics
    assert metrics["test/acc"] >= LEARNED  # the synthetic classes are learnable: chance is 0.1
    assert metrics["epochs"] == 2
    # last.ckpt: the end of training (2 epochs of 400 images / 50), resumable, with the precision it ran in
    last = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 * STEPS_PER_EPOCH and last["epoch"] == 1
    assert last["resnet_cifar_precision"] == "32-true" and "optimizer_states" in last and "loops" in last
    # the best checkpoint: named after its epoch and val/acc, which is the run's val/acc_best
    best = Path(metrics["best_ckpt"])
    assert best.parent == trained_run / "checkpoints"
    epoch, acc = re.fullmatch(r"epoch(\d{3})-val_acc(\d\.\d{4})\.ckpt", best.name).groups()
    assert float(acc) == pytest.approx(metrics["val/acc_best"], abs=5e-5)
    assert torch.load(best, weights_only=True)["epoch"] == int(epoch)
    # the config as composed from the command line
    config = yaml.safe_load((trained_run / ".hydra" / "config.yaml").read_text())
    assert config["data"]["root"] == str(synthetic_root) and config["trainer"]["max_epochs"] == 2
    assert config["trainer"]["precision"] == "32-true" and config["model"]["name"] == "resnet20"
    # the log: the data and precision the run used, and the closing summary
    log = (trained_run / "train.log").read_text()
    assert "CIFAR-10 from " in log and ": 400 train, 100 val, 100 test images, 10 classes" in log
    assert "precision 32-true: set in the config" in log
    # ... a summary a person reads, not the metrics JSON (per-class tables, bins: metrics.json keeps them)
    summary = log[log.index("Summary:") :].splitlines()[1:]
    assert len(summary) == 4 and all(len(line) < 200 for line in summary), summary
    assert summary[0].strip() == (  # the default recipe's TTA, the report's two others beside it
        f"test accuracy {metrics['test/acc']:.4f} with flip + 1-pixel translate TTA (without it "
        f"{metrics['test/top1_no_tta']:.4f}, flip only {metrics['test/top1_flip_tta']:.4f})"
    )
    assert summary[1].strip().startswith(f"calibrated ECE {metrics['test/ece_calibrated']:.4f}")
    assert summary[2].strip() == f"best checkpoint {best} (val/acc_best {metrics['val/acc_best']:.4f})"
    assert str(trained_run / "metrics.json") in summary[3] and str(trained_run / "report" / "report.md") in summary[3]
    assert '"per_class"' not in log and '"reliability"' not in log


def test_tensorboard_has_the_curves_and_hparams(trained_run):
    events = list((trained_run / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(trained_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/acc"}
    assert expected <= tags, tags
    assert {"lr-SGD/head", "lr-SGD/backbone"} <= tags, tags
    assert len(acc.Scalars("val/acc")) == 2  # one per epoch
    # val/acc_best is the running maximum of val/acc, and metrics.json holds the final values
    # (log_hyperparams also writes val/acc_best = 0 at step 0: the HPARAMS tab's placeholder)
    val = [e.value for e in acc.Scalars("val/acc")]
    best_at = {e.step: e.value for e in acc.Scalars("val/acc_best")}
    best = [best_at[e.step] for e in acc.Scalars("val/acc")]
    assert best == pytest.approx([max(val[: i + 1]) for i in range(len(val))], abs=1e-6)
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["val/acc_best"] == pytest.approx(max(val), abs=1e-6)
    assert metrics["val/acc"] == pytest.approx(val[-1], abs=1e-6)
    # the learning rate per step: the default OneCycle, from lr/25 up to optimizer.lr over the first quarter
    # of the steps, then down to ~0
    head = [e.value for e in acc.Scalars("lr-SGD/head")]
    steps = 2 * STEPS_PER_EPOCH
    assert len(head) == steps and max(head) == pytest.approx(0.2, rel=1e-6) and head[0] == pytest.approx(0.2 / 25)
    assert head.index(max(head)) == steps // 4 - 1 and head[-1] < 0.2 / 25 / 1e3
    # the hyperparameters: the run's config flattened, the precision that ran, the model's size
    hparams = yaml.safe_load((trained_run / "tensorboard" / "hparams.yaml").read_text())
    assert hparams["optimizer.lr"] == 0.2 and hparams["model.name"] == "resnet20"
    assert hparams["trainer.precision"] == "32-true" and hparams["trainer.max_epochs"] == 2
    # ResNet-20 with shortcut B (1x1 projections at the two downsamplings): 0.27M
    assert hparams["model/params_total"] == hparams["model/params_trainable"] == 272_474


def test_eval_reports_the_same_test_accuracy(trained_run, synthetic_root, tmp_path):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    proc = run_script(
        "eval.py",
        f"ckpt_path={metrics['best_ckpt']}",
        f"data.root={synthetic_root}",
        "trainer.accelerator=cpu",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((tmp_path / "metrics.json").read_text())
    assert evaluated["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert evaluated["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-5)


def test_resume_with_another_length_of_onecycle_is_refused(trained_run, synthetic_root, tmp_path):
    """The default OneCycle keeps the checkpoint's length: resumed for a third epoch it would fail past its
    16 steps (torch: 'Tried to step 17 times'). One line instead, before training, the checkpoint untouched."""
    last = trained_run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    proc = run_script(
        "train.py",
        *synthetic_overrides(synthetic_root),
        "trainer.max_epochs=3",
        f"ckpt_path={last}",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert error == [
        f"error: ckpt_path: the checkpoint's OneCycle schedule is {2 * STEPS_PER_EPOCH} steps long, this run's "
        f"{3 * STEPS_PER_EPOCH} (another trainer.max_epochs or data size): resume with the checkpoint's settings, "
        "or train on from its weights in a new run (model.weights_path=<ckpt>)"
    ], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and last.read_bytes() == before
    assert not (tmp_path / "metrics.json").exists()


def test_resume_from_last_checkpoint_continues(synthetic_root, tmp_path):
    """A run resumed for more epochs (a schedule that allows it: cosine) continues the global step."""
    first_dir, resumed_dir = tmp_path / "first", tmp_path / "resumed"
    common = [*synthetic_overrides(synthetic_root), "scheduler=cosine", "report=none"]
    for run_dir, extra in ((first_dir, []), (resumed_dir, [f"ckpt_path={first_dir / 'checkpoints' / 'last.ckpt'}"])):
        epochs = 2 if run_dir == first_dir else 3
        run_dir.mkdir()
        proc = run_script(
            "train.py", *common, f"trainer.max_epochs={epochs}", *extra, f"hydra.run.dir={run_dir}", cwd=run_dir
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((resumed_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 3
    first = EventAccumulator(str(first_dir / "tensorboard"))
    first.Reload()
    resumed = EventAccumulator(str(resumed_dir / "tensorboard"))
    resumed.Reload()
    assert len(resumed.Scalars("val/acc")) == 1  # only the third epoch ran
    # the global step continues from the checkpoint instead of restarting at zero
    assert resumed.Scalars("val/acc")[0].step > first.Scalars("val/acc")[-1].step


def test_resumed_after_its_last_epoch_still_reports_val_acc_best(synthetic_root, tmp_path):
    """Killed during the test or the report, a run resumes at its end: nothing is left to fit, and the
    restored best checkpoint's score is its val/acc_best (a sweep job needs it as its objective)."""
    overrides = [*synthetic_overrides(synthetic_root), "trainer.max_epochs=1", "report=none", "logger=none"]
    first = train(compose_cfg(overrides, tmp_path))
    (tmp_path / "metrics.json").unlink()  # as if killed before it was written
    again = train(compose_cfg([*overrides, "ckpt_path=last"], tmp_path))
    assert "val/acc" not in again  # no epoch ran again
    assert again["val/acc_best"] == pytest.approx(first["val/acc_best"], abs=1e-7)
    assert again["test/acc"] == first["test/acc"]


def test_multirun_sweeps_the_learning_rate(synthetic_root, tmp_path):
    proc = run_script(
        "train.py",
        "-m",
        "optimizer.lr=0.2,0.02",
        *synthetic_overrides(synthetic_root),
        "trainer.max_epochs=1",
        "scheduler=cosine",
        "scheduler.warmup_epochs=0.5",
        f"hydra.sweep.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in runs] == ["0", "1"]
    for run, lr in zip(runs, (0.2, 0.02)):
        assert "val/acc_best" in json.loads((run / "metrics.json").read_text())
        # the LR each job trained with (peak of the warm-up), not only the override Hydra recorded
        acc = EventAccumulator(str(run / "tensorboard"))
        acc.Reload()
        head = [e.value for e in acc.Scalars("lr-SGD/head")]
        assert len(head) == STEPS_PER_EPOCH and max(head) == pytest.approx(lr, rel=1e-6), (run.name, head)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.name=resnet19"], "model.name='resnet19': expected one of resnet20, resnet32"),
        (["stage.name=probe"], "stage.name='probe': expected one of scratch, linear_probe, finetune"),
        (["optimizer.lr=-0.1"], "optimizer.lr=-0.1: expected a number in (0, 10]"),
        (["optimizer.lr=0"], "optimizer.lr=0: expected a number in (0, 10]"),
        (["stage=finetune", "model.weights_path=x.pt"], "model.weights_path=x.pt does not exist"),
        (["stage=finetune"], "stage=finetune starts from pretrained weights but resnet20 has none"),
        (
            [
                "model=resnet18",
                "stage=finetune",
                "model.pretrained=true",
                "trainer.max_epochs=1",
                "scheduler=cosine",
                "scheduler.warmup_epochs=0",
            ],
            "unfreeze_at_epoch=1 must be < trainer.max_epochs=1",
        ),
        (["model=resnet18", "stage=linear_probe", "model.pretrained=false"], "set model.pretrained=true"),
        (
            ["model=resnet18", "stage=linear_probe", "model.cifar_stem=true"],
            "model.cifar_stem=true replaces its pretrained stem with a random one that would never train",
        ),
        (
            ["experiment=cpu_30min", "trainer.max_time=null"],
            "scheduler.progress=time needs a wall-clock budget: set trainer.max_time",
        ),
        (["ckpt_path=nowhere.ckpt"], "ckpt_path=nowhere.ckpt does not exist"),
        (["label_smoothing=1.5"], "label_smoothing=1.5: expected a number in [0, 1)"),
        (
            ["scheduler=multistep", "scheduler.milestones=[50,75]"],
            "scheduler.milestones[0]=50: expected a number in (0, 1)",
        ),
    ],
)
def test_config_errors_are_caught_before_anything_loads(overrides, message, tmp_path):
    cfg = compose_cfg(overrides, tmp_path)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_train_config(cfg)


def _assert_one_line_error(proc, message: str) -> None:
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize(
    "overrides, message, code",
    [
        (["model=resnet99"], "Could not find 'model/resnet99'", 1),  # Hydra's own composition error: its exit 1
        (["optimizer.lr=-1"], "error: optimizer.lr=-1: expected a number in (0, 10]", 2),
        (["data.download=false"], "error: CIFAR-10 not found", 2),
    ],
)
def test_cli_errors_are_one_line_without_traceback(overrides, message, code, tmp_path):
    """One line exactly (README: "Bad input ends with one line `error: ...` on stderr and exit status 2"; a
    group Hydra cannot compose is Hydra's own one-line error and exit 1), the documented exit status."""
    empty = tmp_path / "empty"
    empty.mkdir()
    env_overrides = [f"data.root={empty}", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run_script("train.py", *env_overrides, *overrides, cwd=tmp_path)
    _assert_one_line_error(proc, message)
    assert proc.returncode == code
    errors = [line for line in proc.stderr.splitlines() if message in line or line.startswith("error:")]
    assert errors == [next(line for line in proc.stderr.splitlines() if message in line)], proc.stderr[-2000:]


def test_finetune_offline_without_the_imagenet_file_names_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    """``model=resnet18 stage=finetune`` with an empty TORCH_HOME and no network (a proxy on a closed port,
    so the test does not depend on the machine's network): one line with the URL and the cache path."""
    import torchvision

    torch_home, empty = tmp_path / "torch_home", tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    for var in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    target = torch_home / "hub" / "checkpoints" / Path(url).name
    run_dir = tmp_path / "run"
    overrides = ["model=resnet18", "stage=finetune", f"data.root={empty}", f"hydra.run.dir={run_dir}"]
    proc = run_script("train.py", *overrides, cwd=tmp_path)
    _assert_one_line_error(proc, f"Download {url} and put it at {target} (under TORCH_HOME), or set model.weights_path")
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [
        next(line for line in proc.stderr.splitlines() if line.startswith("error: cannot get the ImageNet weights"))
    ]
    assert [p for p in torch_home.rglob("*") if p.is_file()] == []  # no partial download left in the cache
    assert not (run_dir / "checkpoints").exists()


def test_resume_from_a_file_that_is_not_a_checkpoint(tmp_path, synthetic_root):
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_text("hello")
    proc = run_script(
        "train.py",
        *synthetic_overrides(synthetic_root),
        f"ckpt_path={bogus}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    _assert_one_line_error(proc, "is not a PyTorch checkpoint")
    assert proc.returncode == 2


class TrainerSpy(pl.Callback):
    """Records the Trainer's callbacks and loggers as training starts."""

    seen: dict[str, list] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        TrainerSpy.seen.update(callbacks=[type(c).__name__ for c in trainer.callbacks], loggers=list(trainer.loggers))


def test_runs_without_a_logger(synthetic_root, tmp_path):
    """logger=none: the Trainer has no logger (not even Lightning's default) and no logger writes a file, and the
    configured LR monitor (which needs a logger) is dropped."""
    from resnet_cifar.run import train

    cfg = compose_cfg(
        [*synthetic_overrides(synthetic_root), "logger=none", "report=none", "trainer.max_epochs=1"]
        + ["scheduler=cosine", "scheduler.warmup_epochs=0", "+callbacks.spy._target_=test_train.TrainerSpy"],
        tmp_path / "run",
    )
    assert cfg.callbacks.lr_monitor is not None  # configured, so dropping it is tested
    TrainerSpy.seen.clear()
    train(cfg)
    assert "TrainerSpy" in TrainerSpy.seen["callbacks"] and "LearningRateMonitor" not in TrainerSpy.seen["callbacks"]
    assert TrainerSpy.seen["loggers"] == []
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")}
    logger_names = ("tensorboard", "lightning_logs", "wandb", "mlflow", "mlruns", "events.out.tfevents", ".csv")
    assert not [p for p in written if any(name in p for name in logger_names)], sorted(written)
    assert "run/metrics.json" in written


def test_a_run_without_the_optimized_metric_warns_outside_a_sweep(tmp_path, caplog):
    cfg = compose_cfg([], tmp_path)
    assert cfg.optimized_metric == "val/acc_best"
    with caplog.at_level("WARNING"):
        assert objective(cfg, {"train/acc": 0.5}) is None  # e.g. trainer.limit_val_batches=0
    assert "optimized_metric='val/acc_best' was not logged" in caplog.text
    assert objective(cfg, {"val/acc_best": 0.75}) == 0.75
