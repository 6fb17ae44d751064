"""EMA of the weights (``callbacks=[default,ema]``): the update arithmetic, the weights that validation,
test, eval, predict and export use, and an exact resume of both copies."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from helpers import compose_cfg, run_train, synthetic_overrides
from torch import nn

from resnet_cifar.errors import ConfigError
from resnet_cifar.export import export, load_safetensors_model
from resnet_cifar.inference import Predictor
from resnet_cifar.run import evaluate, train
from resnet_cifar.training.ema import EmaUpdate, EMAWeights

STEPS_PER_EPOCH = 8  # 400 training images / batch 50


class Tiny(pl.LightningModule):
    """One weight, one batch norm: a float parameter, float buffers and an integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.bn = nn.BatchNorm1d(1)


def run_updates(cb: EMAWeights, module: Tiny, weights: list[float]) -> list[float]:
    """Set the weight, then end optimizer step k (1-based) for each value; the average after each."""
    cb.setup(SimpleNamespace(), module, "fit")
    out = []
    for step, w in enumerate(weights, start=1):
        module.w.data.fill_(w)
        module.bn.num_batches_tracked.fill_(10 * step)
        cb.on_train_batch_end(SimpleNamespace(global_step=step), module, None, None, step - 1)
        out.append(cb._average_model.module.w.item())
    return out


def test_ema_update_arithmetic_on_known_values():
    # the first update copies, then ema <- 0.9 ema + 0.1 w
    assert run_updates(EMAWeights(decay=0.9), Tiny(), [1.0, 3.0, 5.0]) == pytest.approx([1.0, 1.2, 1.58])
    # every 2nd step from step index 1 (global steps 2, 4, 6): the values of those steps only
    cb = EMAWeights(decay=0.5, update_every_n_steps=2, update_starting_at_step=1)
    assert run_updates(cb, Tiny(), [7.0, 1.0, 7.0, 3.0, 7.0, 5.0]) == pytest.approx([0.0, 1.0, 1.0, 2.0, 2.0, 3.5])
    # integer buffers are copied (batch norm's step counter), not averaged
    assert int(cb._average_model.module.bn.num_batches_tracked) == 60
    assert int(cb._average_model.n_averaged) == 3


def test_before_its_first_update_the_average_is_the_training_weights():
    """update_starting_at_step: validation and checkpoints see the training weights until the average starts."""
    module, cb = Tiny(), EMAWeights(decay=0.5, update_starting_at_step=3)
    run_updates(cb, module, [1.0, 2.0])  # steps 1 and 2: no update yet
    module.w.data.fill_(4.0)
    cb.on_validation_epoch_start(SimpleNamespace(), module)  # swaps the average in
    assert module.w.item() == 4.0
    cb.on_validation_epoch_end(SimpleNamespace(), module)
    checkpoint = {"state_dict": module.state_dict()}
    cb.on_save_checkpoint(SimpleNamespace(), module, checkpoint)
    assert checkpoint["state_dict"]["w"].item() == checkpoint["current_model_state"]["w"].item() == 4.0
    module.w.data.fill_(6.0)
    cb.on_train_batch_end(SimpleNamespace(global_step=4), module, None, None, 3)  # the first update copies
    module.w.data.fill_(8.0)
    cb.on_train_batch_end(SimpleNamespace(global_step=5), module, None, None, 4)
    assert cb._average_model.module.w.item() == 7.0


def test_ema_warmup_ramps_the_decay():
    update = EmaUpdate(0.9, warmup=True)
    assert [update.decay_at(n) for n in (1, 2, 10, 100)] == pytest.approx([2 / 11, 3 / 12, 0.55, 0.9])
    d1, d2 = 2 / 11, 3 / 12
    expected = [1.0, d1 * 1 + (1 - d1) * 3, d2 * (d1 * 1 + (1 - d1) * 3) + (1 - d2) * 5]
    assert run_updates(EMAWeights(decay=0.9, warmup=True), Tiny(), [1.0, 3.0, 5.0]) == pytest.approx(expected)
    with pytest.raises(ConfigError, match=r"callbacks.ema.decay=1.0: expected a number in \[0, 1\)"):
        EMAWeights(decay=1.0)


def ema_overrides(root: Path) -> list[str]:
    return [
        *synthetic_overrides(root),
        "callbacks=[default,ema]",
        "callbacks.ema.decay=0.5",  # far from the training weights after 16 steps
        "callbacks.ema.update_every_n_steps=3",
        "callbacks.ema.warmup=true",
        "model.dropout=0.2",
        "trainer.deterministic=true",
        "callbacks.last_checkpoint.every_n_train_steps=3",
        "callbacks.last_checkpoint.every_n_minutes=null",
        "logger=csv",
    ]


def checkpoint(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def ema_run(synthetic_root, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ema_run")
    metrics = train(compose_cfg(ema_overrides(synthetic_root), out))
    return out, metrics


def differing(a: dict, b: dict) -> list[str]:
    return [k for k in a if k.endswith("weight") and not torch.equal(a[k], b[k])]


def test_checkpoints_hold_the_ema_as_their_weights_and_the_training_weights_beside(ema_run):
    out, metrics = ema_run
    best = checkpoint(metrics["best_ckpt"])
    assert best["averaging_state"]["n_averaged"] > 1
    assert differing(best["state_dict"], best["current_model_state"])  # the EMA is not the training weights
    # last.ckpt: written after the last epoch (validated), before the end of training
    last = checkpoint(out / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2 * STEPS_PER_EPOCH
    assert differing(last["state_dict"], last["current_model_state"])


def test_test_eval_predict_and_export_use_the_ema_weights(ema_run, synthetic_root, tmp_path):
    """train.py's test, eval.py, predict.py and export.py all use the EMA weights of the best checkpoint."""
    out, metrics = ema_run
    best = checkpoint(metrics["best_ckpt"])
    ema = {k.removeprefix("model."): v for k, v in best["state_dict"].items() if k.startswith("model.")}
    # eval.py on the best checkpoint repeats train.py's test numbers: both tested the EMA weights
    cfg = compose_cfg([f"ckpt_path={metrics['best_ckpt']}", f"data.root={synthetic_root}"], tmp_path / "eval", "eval")
    evaluated = evaluate(cfg)
    assert evaluated["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-6)
    assert evaluated["test/acc"] == metrics["test/acc"]
    # the control: the same checkpoint with the training weights as its state_dict gives another test loss, so
    # train.py's test (trainer.test(ckpt_path=best) after fit, where Lightning's callback would load the training
    # weights) and eval.py tested the EMA weights
    raw_ckpt = tmp_path / "raw.ckpt"
    torch.save({**best, "state_dict": best["current_model_state"]}, raw_ckpt)
    raw_cfg = compose_cfg([f"ckpt_path={raw_ckpt}", f"data.root={synthetic_root}"], tmp_path / "raw_eval", "eval")
    assert evaluate(raw_cfg)["test/loss"] != pytest.approx(metrics["test/loss"], rel=1e-6)
    # ... and the training weights would have given another loss (so the comparison above can fail)
    raw = Predictor.from_checkpoint(metrics["best_ckpt"])
    raw.module.load_state_dict(best["current_model_state"])
    predictor = Predictor.from_checkpoint(metrics["best_ckpt"])
    assert all(torch.equal(v, ema[k]) for k, v in predictor.module.model.state_dict().items())
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    assert not torch.allclose(predictor.probabilities(images), raw.probabilities(images))
    # export.py writes the EMA weights
    overrides = [f"ckpt_path={metrics['best_ckpt']}", "formats=[safetensors]", "check_images=0"]
    export(compose_cfg(overrides, tmp_path, "export"))
    exported, _ = load_safetensors_model(tmp_path / "model.safetensors")
    assert all(torch.equal(v, ema[k]) for k, v in exported.state_dict().items())


def test_sigkill_mid_epoch_then_resume_continues_both_copies_bit_for_bit(synthetic_root, ema_run, tmp_path):
    ref_out, ref_metrics = ema_run
    step = STEPS_PER_EPOCH + random.Random(3).randrange(2, STEPS_PER_EPOCH - 1)
    out = tmp_path / "run"
    args = [*ema_overrides(synthetic_root), "ckpt_path=last"]
    killed = run_train(out, *args, "+callbacks.kill._target_=resume_faults.KillAtStep", f"+callbacks.kill.step={step}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    saved = checkpoint(out / "checkpoints" / "last.ckpt")
    assert STEPS_PER_EPOCH < saved["global_step"] <= step and "current_model_state" in saved
    metrics = train(compose_cfg(args, out))
    ref, resumed = checkpoint(ref_out / "checkpoints" / "last.ckpt"), checkpoint(out / "checkpoints" / "last.ckpt")
    for key in ("state_dict", "current_model_state", "averaging_state"):
        assert ref[key].keys() == resumed[key].keys()
        assert not [k for k in ref[key] if not torch.equal(ref[key][k], resumed[key][k])], key
    same = ("test/acc", "test/loss", "val/acc", "val/acc_best", "train/acc", "epochs")
    assert {k: metrics[k] for k in same} == {k: ref_metrics[k] for k in same}


def test_a_save_after_training_ended_keeps_the_training_weights_beside_the_ema(synthetic_root, tmp_path):
    """A run that stops mid-epoch (here max_steps=11; trainer.max_time alike) writes last.ckpt after the EMA
    callback's on_train_end: it must hold what a save at step 11 of a longer run holds."""
    # every_n_epochs=null (as gpu_3min): no epoch-end save when max_steps ends the epoch early, so
    # LastCheckpoint saves in on_train_end, after the EMA callback's
    base = [
        *ema_overrides(synthetic_root),
        "scheduler=none",
        "test=false",
        "callbacks.last_checkpoint.every_n_epochs=null",
    ]
    snapshot = [
        "+callbacks.snap._target_=pytorch_lightning.callbacks.ModelCheckpoint",
        f"+callbacks.snap.dirpath={tmp_path / 'snap'}",
        "+callbacks.snap.filename=at11",
        "+callbacks.snap.every_n_train_steps=11",
        "+callbacks.snap.save_top_k=-1",
    ]
    train(compose_cfg([*base, "+trainer.max_steps=12", *snapshot], tmp_path / "longer"))
    train(compose_cfg([*base, "+trainer.max_steps=11"], tmp_path / "stopped"))
    during = checkpoint(tmp_path / "snap" / "at11.ckpt")
    ended = checkpoint(tmp_path / "stopped" / "checkpoints" / "last.ckpt")
    assert during["global_step"] == ended["global_step"] == 11
    for key in ("state_dict", "current_model_state", "averaging_state"):
        assert not [k for k in during[key] if not torch.equal(during[key][k], ended[key][k])], key
    assert differing(ended["state_dict"], ended["current_model_state"])


def test_ema_selection_composes_with_the_default_callbacks(tmp_path):
    cfg = compose_cfg(["callbacks=[default,ema]"], tmp_path)
    assert {"model_checkpoint", "last_checkpoint", "ema"} <= set(cfg.callbacks)
    assert json.loads(json.dumps(dict(cfg.callbacks.ema)))["_target_"] == "resnet_cifar.training.ema.EMAWeights"


def test_a_bad_ema_setting_is_one_line_before_anything_runs(synthetic_root, tmp_path):
    from hydra.errors import InstantiationException

    from resnet_cifar.cli import _user_error_message

    overrides = [*synthetic_overrides(synthetic_root), "callbacks=[default,ema]", "callbacks.ema.decay=1.5"]
    with pytest.raises(InstantiationException) as failure:
        train(compose_cfg(overrides, tmp_path))
    assert _user_error_message(failure.value) == "callbacks.ema.decay=1.5: expected a number in [0, 1)"
    assert not (tmp_path / "checkpoints").exists()
