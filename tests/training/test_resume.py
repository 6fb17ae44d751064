"""Exact resume: a run killed mid-epoch and resumed with ``ckpt_path=last`` ends with the
same weights and metrics as the same run uninterrupted (stage=finetune, in and out of the
unfreeze epoch, dropout on so that the random state matters too)."""

from __future__ import annotations

import csv
import json
import random
import signal
from pathlib import Path

import pytest
import torch
from helpers import compose_cfg, config_model, run_train, synthetic_overrides

from resnet_cifar.cli import EXIT_TERMINATED
from resnet_cifar.data.datamodule import EpochShuffle
from resnet_cifar.data.loader import ResumableLoader
from resnet_cifar.run import train

STEPS_PER_EPOCH = 8  # 400 training images / batch 50
EPOCHS = 2  # epoch 0 frozen, epoch 1 the unfreeze epoch


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A 'pretrained' ResNet-20 to fine-tune from."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet20.pt"
    torch.save(config_model().state_dict(), path)
    return path


def overrides(root: Path, weights: Path, precision: str = "32-true") -> list[str]:
    return [
        *synthetic_overrides(root, precision),
        f"trainer.max_epochs={EPOCHS}",
        "trainer.deterministic=true",
        "stage=finetune",
        "stage.unfreeze_at_epoch=1",
        f"model.weights_path={weights}",
        "model.dropout=0.2",
        "scheduler=cosine",
        "scheduler.warmup_epochs=0.5",
        "callbacks.last_checkpoint.every_n_train_steps=3",
        "callbacks.last_checkpoint.every_n_minutes=null",
        "logger=csv",
    ]


def final_state(out_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(out_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def comparable(metrics: dict) -> dict:
    return {k: (Path(v).name if k == "best_ckpt" else v) for k, v in metrics.items()}


@pytest.fixture(scope="module")
def reference(synthetic_root, weights_file, tmp_path_factory) -> tuple[dict, dict]:
    """The uninterrupted run (in-process): its metrics and final weights."""
    out = tmp_path_factory.mktemp("reference")
    metrics = train(compose_cfg(overrides(synthetic_root, weights_file), out))
    assert metrics["epochs"] == EPOCHS
    return comparable(metrics), final_state(out)


def assert_same_run(out: Path, reference: tuple[dict, dict]) -> None:
    ref_metrics, ref_state = reference
    metrics = comparable(json.loads((out / "metrics.json").read_text()))
    assert metrics == ref_metrics
    state = final_state(out)
    assert state.keys() == ref_state.keys()
    different = [k for k in state if not torch.equal(state[k], ref_state[k])]
    assert not different, f"weights differ after resume: {different[:5]}"


@pytest.mark.parametrize("epoch", [0, 1], ids=["frozen_epoch", "unfreeze_epoch"])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(synthetic_root, weights_file, reference, tmp_path, epoch):
    step = epoch * STEPS_PER_EPOCH + random.Random(epoch).randrange(1, STEPS_PER_EPOCH - 1)
    out = tmp_path / "run"
    args = [*overrides(synthetic_root, weights_file), "ckpt_path=last"]
    killed = run_train(out, *args, "+callbacks.kill._target_=resume_faults.KillAtStep", f"+callbacks.kill.step={step}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert 0 < saved["global_step"] <= step  # resumed from a mid-epoch step, work after it was lost
    assert not (out / "metrics.json").exists()

    # the same command again: finds last.ckpt in the run directory and continues
    metrics = train(compose_cfg(args, out))
    assert metrics["epochs"] == EPOCHS
    assert_same_run(out, reference)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_under_bf16(synthetic_root, weights_file, tmp_path):
    """bf16-mixed, the default on bf16 CPUs and on GPUs (auto): killed in the unfreeze epoch, resumed bit for bit."""
    args = overrides(synthetic_root, weights_file, "bf16-mixed")
    reference_out = tmp_path / "reference"
    metrics = train(compose_cfg(args, reference_out))
    assert metrics["precision"] == "bf16-mixed" and metrics["epochs"] == EPOCHS
    reference = (comparable(metrics), final_state(reference_out))
    out = tmp_path / "run"
    step = STEPS_PER_EPOCH + random.Random(3).randrange(1, STEPS_PER_EPOCH - 1)
    args = [*args, "ckpt_path=last"]
    killed = run_train(out, *args, "+callbacks.kill._target_=resume_faults.KillAtStep", f"+callbacks.kill.step={step}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert STEPS_PER_EPOCH < saved["global_step"] <= step and saved["resnet_cifar_precision"] == "bf16-mixed"
    train(compose_cfg(args, out))
    assert_same_run(out, reference)


def test_sigkill_after_an_epoch_end_resumes_from_the_epoch_end_checkpoint(
    synthetic_root, weights_file, reference, tmp_path
):
    """Only epoch-end saves: the kill in epoch 1 sends the run back to the end of epoch 0 (validated)."""
    out = tmp_path / "run"
    step = STEPS_PER_EPOCH + random.Random(7).randrange(1, STEPS_PER_EPOCH - 1)
    args = [a for a in overrides(synthetic_root, weights_file) if "every_n_train_steps" not in a]
    args += ["callbacks.last_checkpoint.every_n_train_steps=null", "ckpt_path=last"]
    killed = run_train(out, *args, "+callbacks.kill._target_=resume_faults.KillAtStep", f"+callbacks.kill.step={step}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == STEPS_PER_EPOCH and saved["epoch"] == 0
    metrics = train(compose_cfg(args, out))
    assert metrics["epochs"] == EPOCHS
    assert_same_run(out, reference)


@pytest.mark.parametrize(
    ("step", "saved_step"),
    [(STEPS_PER_EPOCH + 4, STEPS_PER_EPOCH + 5), (STEPS_PER_EPOCH - 1, STEPS_PER_EPOCH)],
    ids=["mid_epoch", "last_batch_of_an_epoch"],
)
def test_sigterm_saves_exits_and_resumes(synthetic_root, weights_file, reference, tmp_path, step, saved_step):
    """Mid-epoch, the step in flight is finished and saved; at an epoch's last batch Lightning
    stops after the epoch's validation and its epoch-end checkpoint, which the resume starts from."""
    out = tmp_path / "run"
    args = [*overrides(synthetic_root, weights_file), "ckpt_path=last"]
    stopped = run_train(
        out,
        *args,
        "+callbacks.kill._target_=resume_faults.KillAtStep",
        f"+callbacks.kill.step={step}",
        "+callbacks.kill.signal_name=SIGTERM",
    )
    assert stopped.returncode == EXIT_TERMINATED, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "terminated" and "SIGTERM" in status["error"], status
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == saved_step
    metrics = train(compose_cfg(args, out))
    assert metrics["epochs"] == EPOCHS
    assert_same_run(out, reference)
    # the resumed run appended to the CSV log of the stopped one
    with (out / "csv" / "metrics.csv").open() as f:
        steps = {int(row["step"]) for row in csv.DictReader(f)}
    assert min(steps) < step and max(steps) >= EPOCHS * STEPS_PER_EPOCH - 1


def test_fresh_start_refuses_to_overwrite_a_run(synthetic_root, weights_file, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"previous run")
    from resnet_cifar.errors import OutputError

    with pytest.raises(OutputError, match="already holds a run.*ckpt_path=last"):
        train(compose_cfg(overrides(synthetic_root, weights_file), out))
    assert (out / "checkpoints" / "last.ckpt").read_bytes() == b"previous run"


def test_resumable_loader_skips_the_batches_already_seen():
    data = list(range(20))
    full = ResumableLoader(data, batch_size=4, sampler=EpochShuffle(20, seed=3), drop_last=True)
    full.sampler.set_epoch(2)
    expected = [b.tolist() for b in full]
    it = iter(full)
    seen = [next(it).tolist() for _ in range(2)]
    state = full.state_dict()
    assert state == {"epoch": 2, "batches": 2}

    resumed = ResumableLoader(data, batch_size=4, sampler=EpochShuffle(20, seed=3), drop_last=True)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # Lightning sets the epoch after restoring, before the first batch
    rest = [b.tolist() for b in resumed]
    assert seen + rest == expected
    assert resumed.state_dict() == {"epoch": 2, "batches": 5}
    # the skip is one-shot, and never applies to another epoch
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(3)
    assert len(list(resumed)) == 5


def test_last_checkpoint_is_saved_by_time(tmp_path, monkeypatch):
    """every_n_minutes: a save once that much training time has passed since the last one, not before."""
    from types import SimpleNamespace

    from resnet_cifar.training import checkpointing

    clock = {"now": 1000.0}
    monkeypatch.setattr(checkpointing.time, "monotonic", lambda: clock["now"])
    cb = checkpointing.LastCheckpoint(tmp_path, every_n_train_steps=None, every_n_minutes=2)
    saves = []
    monkeypatch.setattr(cb, "save", lambda trainer, why: saves.append((trainer.global_step, why)))
    batch_progress = SimpleNamespace(is_last_batch=False)
    trainer = SimpleNamespace(
        global_step=1,
        world_size=1,
        strategy=SimpleNamespace(broadcast=lambda x: x),
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=batch_progress)),
    )
    cb.on_train_start(trainer, None)
    for step, now in ((1, 1060.0), (2, 1119.0), (3, 1120.5)):
        trainer.global_step, clock["now"] = step, now
        cb.on_train_batch_end(trainer, None)
    assert saves == [(3, "periodic")]  # 120.5 s after the start, not at 60 or 119 s
    batch_progress.is_last_batch, trainer.global_step, clock["now"] = True, 4, 2000.0
    cb.on_train_batch_end(trainer, None)  # an epoch's last batch: the epoch-end save follows instead
    assert saves == [(3, "periodic")]


def test_last_checkpoint_every_n_epochs_and_the_ddp_clock(tmp_path, monkeypatch):
    """every_n_epochs=2: epoch-end saves after epochs 2 and 4 only, unless a time save is due then. Under DDP
    the ranks agree on a time save through a broadcast, read every CLOCK_EVERY steps only."""
    from types import SimpleNamespace

    from resnet_cifar.training import checkpointing

    clock = {"now": 0.0}
    monkeypatch.setattr(checkpointing.time, "monotonic", lambda: clock["now"])
    cb = checkpointing.LastCheckpoint(tmp_path, every_n_minutes=10, every_n_epochs=2)
    saves, broadcasts = [], []
    monkeypatch.setattr(cb, "save", lambda trainer, why: saves.append((trainer.current_epoch, why)))
    trainer = SimpleNamespace(global_step=0, current_epoch=0, world_size=1, strategy=SimpleNamespace())
    trainer.strategy.broadcast = lambda x: broadcasts.append(trainer.global_step) or x
    cb.on_train_start(trainer, None)
    for epoch in range(4):
        trainer.current_epoch, trainer.global_step = epoch, 100 * (epoch + 1)
        clock["now"] = 700.0 if epoch == 2 else 60.0 * epoch  # 11.7 min at the end of the third epoch
        cb.on_train_epoch_end(trainer, None)
    assert saves == [(1, "epoch end"), (2, "epoch end"), (3, "epoch end")]  # the third: the time was due
    with pytest.raises(ValueError, match="every_n_epochs=0 must be a positive integer or null"):
        checkpointing.LastCheckpoint(tmp_path, every_n_epochs=0)
    # DDP: the broadcast (a collective) only at multiples of CLOCK_EVERY steps
    trainer.world_size, broadcasts[:] = 2, []
    for step in range(1, 3 * checkpointing.CLOCK_EVERY + 1):
        trainer.global_step = step
        cb._due(trainer)
    assert broadcasts == [checkpointing.CLOCK_EVERY * k for k in (1, 2, 3)]


@pytest.mark.parametrize(
    ("saved", "current_device", "restored"),
    [
        ("one", 0, "one"),  # this format: the saving process's GPU
        (["gpu0", "gpu1", "gpu2", "gpu3"], 1, "gpu1"),  # older checkpoints: one state per visible GPU
        (["gpu0", "gpu1"], 3, "gpu1"),  # resumed where more GPUs are visible than when saved: no IndexError
    ],
)
def test_cuda_random_state_restores_on_any_number_of_visible_gpus(monkeypatch, saved, current_device, restored):
    """A checkpoint saved with 4 GPUs visible must resume with 1 (and the reverse) without indexing past them."""
    from resnet_cifar.training import checkpointing

    set_states = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current_device)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: set_states.append(s))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("restores every GPU's state"))
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": saved}
    checkpointing._set_rng_state(state)
    assert set_states == [restored]
