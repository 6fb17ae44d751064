"""DDP on the CPU (``trainer=ddp_cpu``: 2 processes, gloo): sharding, exact evaluation,
rank-zero outputs, the freeze schedule across the unfreeze epoch, LR scaling against one process,
and a run killed and resumed across the unfreeze."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, compose_cfg, config_model, run_script, synthetic_split
from torch.utils.data import DistributedSampler

from resnet_cifar.data.cifar10 import write_batches
from resnet_cifar.data.datamodule import EpochShuffle
from resnet_cifar.data.sharding import eval_sampler, train_sampler
from resnet_cifar.errors import ConfigError
from resnet_cifar.training.optim import lr_scale

N_TEST = 101  # odd: a padding DistributedSampler would count one test image twice


@pytest.fixture(scope="module")
def odd_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("odd_cifar")
    write_batches(root, synthetic_split(500, 0), synthetic_split(N_TEST, 1))
    return root


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A resnet20 state dict standing in for pretrained weights (CIFAR ResNets have none to download)."""
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "resnet20.pt"
    torch.save(config_model().state_dict(), path)
    return path


def ddp_overrides(root: Path, run_dir: Path) -> list[str]:
    return [
        "trainer=ddp_cpu",
        "trainer.precision=32-true",  # compared with a single process and across a resume: fp32 on every CPU
        "module.compile=false",  # compiling in each process costs a minute; compile has tests of its own
        f"data.root={root}",
        "data.strict_sizes=false",
        "data.val_size=99",  # odd too
        "data.batch_size=25",  # per process
        "data.eval_batch_size=25",  # ranks get 51/50 test images: 3 and 2 batches
        "trainer.log_every_n_steps=1",
        "~callbacks.progress_bar",
        "~callbacks.model_summary",
        f"hydra.run.dir={run_dir}",
    ]


def run_ddp(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    """``run_script("train.py", ...)`` with tests/ on the path too (the probe callback), for every rank."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")])}
    env.pop("RESNET_CIFAR_LOGS", None)
    cmd = [sys.executable, str(REPO / "train.py"), *overrides]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def backbone_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def probe(run: Path) -> tuple[list[dict], list[dict]]:
    return (json.loads((run / "probe" / f"rank{r}.json").read_text()) for r in (0, 1))


# ------------------------------------------------------------------ unit


def test_lr_scale_rules():
    assert lr_scale("none", 8) == 1.0
    assert lr_scale("linear", 8) == 8.0
    assert lr_scale("sqrt", 4) == 2.0
    assert lr_scale("sqrt", 1) == lr_scale("linear", 1) == 1.0


def test_train_sampler_deals_the_epoch_order_out_to_the_ranks():
    """Disjoint shards, a new order each epoch, and rank by rank the single-process batches: batch k of 2 ranks
    with batch size b together hold batch k of one process with 2b (Lightning's own wrapper shuffles again)."""

    class Trainer:
        world_size, global_rank = 2, 0

    single = EpochShuffle(40, seed=3)
    shards = {}
    for epoch in (0, 1):
        single.set_epoch(epoch)
        order = list(single)
        for rank in (0, 1):
            Trainer.global_rank = rank
            s = train_sampler(EpochShuffle(40, seed=3), Trainer)
            assert isinstance(s, DistributedSampler)  # so Lightning does not replace it
            s.set_epoch(epoch)  # forwarded to EpochShuffle
            shards[epoch, rank] = list(s)
        assert sorted(shards[epoch, 0] + shards[epoch, 1]) == list(range(40))
        for k in range(4):  # batch size 5 per rank, 10 in one process
            both = shards[epoch, 0][5 * k : 5 * k + 5] + shards[epoch, 1][5 * k : 5 * k + 5]
            assert sorted(both) == sorted(order[10 * k : 10 * k + 10])
    assert shards[0, 0] != shards[1, 0]
    assert train_sampler(single, None) is single


def test_eval_sampler_covers_each_image_once():
    class Trainer:
        world_size, global_rank = 2, 0

    ds = list(range(N_TEST))
    assert eval_sampler(ds, None) is None
    shards = []
    for rank in (0, 1):
        Trainer.global_rank = rank
        shards.append(list(eval_sampler(ds, Trainer)))
    assert sorted(shards[0] + shards[1]) == ds and len(shards[0]) == 51
    with pytest.raises(ConfigError, match="fewer than"):
        eval_sampler([0], Trainer)


# ------------------------------------------------------------------ 2 processes


FINETUNE_LR = 0.02
STEPS_PER_EPOCH = 8  # 401 training images: 200 per rank in batches of 25 (the last, partial batch dropped)


def finetune_overrides(root: Path, weights: Path, run: Path) -> list[str]:
    """finetune across the unfreeze epoch (epoch 0 head only, epoch 1 all), linear LR scaling."""
    return [
        *ddp_overrides(root, run),
        "stage=finetune",
        f"model.weights_path={weights}",
        "stage.unfreeze_at_epoch=1",
        "trainer.max_epochs=2",
        "scheduler=none",
        f"optimizer.lr={FINETUNE_LR}",
        "module.lr_scaling=linear",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.last_checkpoint.every_n_minutes=null",  # last.ckpt after each epoch only
        "+callbacks.probe._target_=probes.RankDigest",
        f"+callbacks.probe.out_dir={run / 'probe'}",
    ]


@pytest.fixture(scope="module")
def ddp_finetune(tmp_path_factory, odd_root, weights_file) -> Path:
    """One uninterrupted 2-process finetune run; several tests read it."""
    run = tmp_path_factory.mktemp("ddp_finetune") / "run"
    r = run_ddp(*finetune_overrides(odd_root, weights_file, run), cwd=run.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def test_ddp_finetune_across_unfreeze_writes_once_and_keeps_the_ranks_identical(ddp_finetune, weights_file):
    run = ddp_finetune
    metrics = json.loads((run / "metrics.json").read_text())
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    assert 0 <= metrics["test/acc"] <= 1 and metrics["epochs"] == 2

    # One set of outputs, written by rank zero: checkpoints, TensorBoard events from one process, one log.
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(ckpts) == 3 and ckpts[-1] == "last.ckpt", ckpts
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and len({e.name.split(".")[4] for e in events}) == 1  # one writer pid
    assert [p.name for p in run.rglob(".hydra")] == [".hydra"]
    log = (run / "train.log").read_text()
    assert log.count("CIFAR-10 from") == 1
    assert "Epoch 1: re-wrapping DDP (0 parameters excluded from gradient sync, was " in log  # the unfreeze

    # The ranks stayed identical (gradients synchronised) before and after the unfreeze epoch.
    rank0, rank1 = probe(run)
    assert rank0 == rank1 and len(rank0) == 2

    # Epoch 0: head only (backbone weights and batch-norm statistics untouched); epoch 1: all.
    start = backbone_state(torch.load(weights_file), "backbone.")
    ep0, ep1 = (torch.load(run / "checkpoints" / c, weights_only=True)["state_dict"] for c in ckpts[:2])
    frozen = backbone_state(ep0, "model.backbone.")
    assert frozen.keys() == start.keys() and len(frozen) > 50  # every tensor of the backbone compared
    assert all(torch.equal(start[k], v) for k, v in frozen.items())
    assert not torch.equal(ep0["model.head.weight"], torch.load(weights_file)["head.weight"])
    assert any(not torch.equal(start[k], v) for k, v in backbone_state(ep1, "model.backbone.").items())

    # module.lr_scaling=linear: 2 processes train at 2 * optimizer.lr.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lrs = {}
    for e in events:
        acc = EventAccumulator(str(e)).Reload()
        lrs.update({t: acc.Scalars(t)[0].value for t in acc.Tags()["scalars"] if t.startswith("lr-")})
    heads = [v for k, v in lrs.items() if k.endswith("head")]
    assert heads and all(math.isclose(v, 2 * FINETUNE_LR, rel_tol=1e-6) for v in heads), lrs


def test_ddp_first_epoch_matches_a_single_process_run(ddp_finetune, odd_root, weights_file, tmp_path):
    """The frozen epoch (backbone in eval mode: no per-rank batch statistics) of 2 processes x 25 images at
    2 x lr (linear scaling) is one process's epoch with the same global batch of 50 at that LR: the same
    images per step (rank r takes every other image of the epoch's order), the mean gradient over them."""
    from resnet_cifar.run import train

    single = [o for o in finetune_overrides(odd_root, weights_file, tmp_path) if "probe" not in o]
    single = [o for o in single if o.split("=")[0] not in ("trainer", "data.batch_size", "optimizer.lr")]
    single += ["trainer=cpu", "data.batch_size=50", f"optimizer.lr={2 * FINETUNE_LR}", "module.lr_scaling=none"]
    single += ["+trainer.max_steps=8", "test=false", "report=none", "logger=none", "~callbacks.lr_monitor"]
    train(compose_cfg(single, tmp_path))  # ends after epoch 0 (max_steps)
    ddp = next((ddp_finetune / "checkpoints").glob("epoch000-*.ckpt"))
    one = next((tmp_path / "checkpoints").glob("epoch000-*.ckpt"))
    ddp_state, one_state = (torch.load(p, weights_only=True) for p in (ddp, one))
    assert ddp_state["global_step"] == one_state["global_step"] == STEPS_PER_EPOCH
    ddp_state, one_state = ddp_state["state_dict"], one_state["state_dict"]
    assert ddp_state.keys() == one_state.keys()
    start = torch.load(weights_file)["head.weight"]
    assert not torch.allclose(one_state["model.head.weight"], start, atol=1e-3)  # the head trained
    for k in ddp_state:
        torch.testing.assert_close(ddp_state[k], one_state[k], atol=1e-6, rtol=1e-5, msg=k)


def test_ddp_test_accuracy_equals_a_single_process_evaluation(ddp_finetune, odd_root, tmp_path):
    """The DDP test accuracy (101 images over 2 ranks, un-padded) equals a single-process evaluation."""
    metrics = json.loads((ddp_finetune / "metrics.json").read_text())
    r = run_script("eval.py", f"ckpt_path={metrics['best_ckpt']}", f"data.root={odd_root}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    single = json.loads(next((tmp_path / "logs" / "eval" / "runs").glob("*/metrics.json")).read_text())
    assert single["test/acc"] == metrics["test/acc"]
    assert single["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-5)
    assert round(single["test/acc"] * N_TEST, 3).is_integer()
    # The report of the DDP run covers both ranks' shares (accumulated in the test loop and
    # synchronised) and agrees number for number with the single-process evaluation.
    ddp_report, one_report = metrics["report"], single["report"]
    assert ddp_report["num_images"] == one_report["num_images"] == N_TEST
    assert ddp_report["top1"] == pytest.approx(metrics["test/acc"], abs=1e-7)
    assert ddp_report["confusion_matrix"] == one_report["confusion_matrix"]
    for key in ("top1", "top5", "ece", "nll", "macro_f1", "ece_calibrated", "nll_calibrated"):
        assert ddp_report[key] == pytest.approx(one_report[key], abs=1e-6), key
    assert ddp_report["reliability"]["count"] == one_report["reliability"]["count"]
    assert sorted(ddp_report["mistakes"]["index"]) == sorted(one_report["mistakes"]["index"])
    # the temperature: fitted on both ranks' shares of the validation split (gathered), stored, reused by eval.py
    assert one_report["temperature"] == ddp_report["temperature"]
    assert ddp_report["calibration"]["source"] == "fitted on the validation split (99 images)"


def test_ddp_killed_and_resumed_matches_the_uninterrupted_run(ddp_finetune, odd_root, weights_file, tmp_path):
    """Both processes killed (SIGKILL) in the unfreeze epoch; the same command resumes from the end of epoch 0,
    re-wraps DDP with the unfrozen backbone, and ends with the uninterrupted run's weights and metrics."""
    run = tmp_path / "run"
    args = [*finetune_overrides(odd_root, weights_file, run), "ckpt_path=last"]
    step = STEPS_PER_EPOCH + 3
    kill = ["+callbacks.kill._target_=resume_faults.KillAtStep", f"+callbacks.kill.step={step}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")])}
    env.pop("RESNET_CIFAR_LOGS", None)
    # each rank kills itself at that step (after the backward's all-reduce, so neither waits for the other);
    # its own session, so that the group is cleared whatever happens
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args, *kill],
        cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (0, STEPS_PER_EPOCH)  # the end of the frozen epoch
    assert not (run / "metrics.json").exists()

    r = run_ddp(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (run / "train.log").read_text()
    resumed = log[log.rindex("Resuming from") :]
    assert "Epoch 1: re-wrapping DDP (0 parameters excluded from gradient sync, was " in resumed
    rank0, rank1 = probe(run)
    assert rank0 == rank1  # the resumed epoch kept the ranks identical: the backbone's gradients were synchronised
    reference = torch.load(ddp_finetune / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state.keys() == reference.keys()
    different = [k for k in state if not torch.equal(state[k], reference[k])]
    assert not different, f"weights differ after the resume: {different[:5]}"
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (run, ddp_finetune))
    for key in ("train/loss", "val/acc", "val/acc_best", "test/acc", "test/loss", "epochs"):
        assert ours[key] == theirs[key], key


def test_ddp_linear_probe_keeps_backbone(tmp_path, odd_root, weights_file):
    run = tmp_path / "run"
    r = run_ddp(
        *ddp_overrides(odd_root, run),
        "stage=linear_probe",
        f"model.weights_path={weights_file}",
        "trainer.max_epochs=1",
        "scheduler=none",  # no warm-up in a 1-epoch run
        "test=false",
        "+callbacks.probe._target_=probes.RankDigest",
        f"+callbacks.probe.out_dir={run / 'probe'}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rank0, rank1 = probe(run)
    assert rank0 == rank1
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    start = torch.load(weights_file)
    backbone = {k: v for k, v in backbone_state(state, "model.").items() if k.startswith("backbone.")}
    expected_keys = {k for k in start if k.startswith("backbone.")}
    assert expected_keys and backbone.keys() == expected_keys  # all() over nothing would pass
    assert all(torch.equal(start[k], v) for k, v in backbone.items())
    assert not torch.equal(state["model.head.weight"], start["head.weight"])
