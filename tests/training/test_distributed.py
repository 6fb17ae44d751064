"""DDP on the CPU (``trainer=ddp_cpu``: 2 processes, gloo): sharding, exact evaluation,
rank-zero outputs, the freeze schedule across the unfreeze epoch, and LR scaling."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_script, synthetic_split
from lightning_fabric.utilities.distributed import DistributedSamplerWrapper

from resnet_cifar.data.cifar10 import write_batches
from resnet_cifar.data.datamodule import EpochShuffle
from resnet_cifar.data.sharding import eval_sampler
from resnet_cifar.errors import ConfigError
from resnet_cifar.models.factory import build_model
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
    torch.save(build_model("resnet20").state_dict(), path)
    return path


def ddp_overrides(root: Path, run_dir: Path) -> list[str]:
    return [
        "trainer=ddp_cpu",
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


def test_train_sampler_is_sharded_per_epoch():
    """Lightning wraps EpochShuffle in a DistributedSamplerWrapper: disjoint shards, a new order each epoch."""
    shards = {}
    for epoch in (0, 1):
        for rank in (0, 1):
            s = DistributedSamplerWrapper(EpochShuffle(10, seed=3), num_replicas=2, rank=rank, shuffle=False)
            s.set_epoch(epoch)
            shards[epoch, rank] = list(s)
        assert sorted(shards[epoch, 0] + shards[epoch, 1]) == list(range(10))
    assert shards[0, 0] != shards[1, 0]


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


def test_ddp_finetune_across_unfreeze_matches_single_process(tmp_path, odd_root, weights_file):
    run = tmp_path / "run"
    r = run_ddp(
        *ddp_overrides(odd_root, run),
        "stage=finetune",
        f"model.weights_path={weights_file}",
        "stage.unfreeze_at_epoch=1",
        "trainer.max_epochs=2",
        "scheduler=none",
        "optimizer.lr=0.02",
        "module.lr_scaling=linear",
        "callbacks.model_checkpoint.save_top_k=-1",
        "+callbacks.probe._target_=probes.RankDigest",
        f"+callbacks.probe.out_dir={run / 'probe'}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    assert 0 <= metrics["test/acc"] <= 1 and metrics["epochs"] == 2

    # One set of outputs, written by rank zero: checkpoints, TensorBoard events from one process, one log.
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(ckpts) == 3 and ckpts[-1] == "last.ckpt", ckpts
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and len({e.name.split(".")[4] for e in events}) == 1  # one writer pid
    assert [p.name for p in run.rglob(".hydra")] == [".hydra"]
    assert (run / "train.log").read_text().count("CIFAR-10 from") == 1

    # The ranks stayed identical (gradients synchronised) before and after the unfreeze epoch.
    rank0, rank1 = probe(run)
    assert rank0 == rank1 and len(rank0) == 2

    # Epoch 0: head only (backbone weights and batch-norm statistics untouched); epoch 1: all.
    start = backbone_state(torch.load(weights_file), "backbone.")
    ep0, ep1 = (torch.load(run / "checkpoints" / c, weights_only=True)["state_dict"] for c in ckpts[:2])
    assert all(torch.equal(start[k], v) for k, v in backbone_state(ep0, "model.backbone.").items())
    assert not torch.equal(ep0["model.head.weight"], torch.load(weights_file)["head.weight"])
    assert any(not torch.equal(start[k], v) for k, v in backbone_state(ep1, "model.backbone.").items())

    # module.lr_scaling=linear: 2 processes train at 2 * optimizer.lr.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lrs = {}
    for e in events:
        acc = EventAccumulator(str(e)).Reload()
        lrs.update({t: acc.Scalars(t)[0].value for t in acc.Tags()["scalars"] if t.startswith("lr-")})
    assert lrs and all(math.isclose(v, 0.04, rel_tol=1e-6) for k, v in lrs.items() if k.endswith("head")), lrs

    # The DDP test accuracy (101 images over 2 ranks, un-padded) equals a single-process evaluation.
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
    for key in ("top1", "top5", "ece", "nll", "macro_f1"):
        assert ddp_report[key] == pytest.approx(one_report[key], abs=1e-6), key
    assert ddp_report["reliability"]["count"] == one_report["reliability"]["count"]
    assert sorted(ddp_report["mistakes"]["index"]) == sorted(one_report["mistakes"]["index"])


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
    assert all(torch.equal(start[k], v) for k, v in backbone_state(state, "model.").items() if k.startswith("backbone"))
    assert not torch.equal(state["model.head.weight"], start["head.weight"])
