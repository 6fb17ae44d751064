"""The CUDA code paths, checked on the CPU: each test stands a GPU in for what decides (``is_cuda``, a
strategy, a device) and runs the real code behind it (issue 29)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from resnet_cifar.data.datamodule import CIFAR10DataModule
from resnet_cifar.training.module import ImageClassifier
from resnet_cifar.training.optim import fused_kwargs


# ------------------------------------------------------------- fused optimizers and gradient clipping
def test_fused_on_cuda_only_without_clipping():
    cuda, cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    assert fused_kwargs([cuda, cuda], clipping=False) == {"fused": True}
    assert fused_kwargs([cuda, cuda], clipping=True) == {"foreach": True}
    assert fused_kwargs([cuda, cpu], clipping=False) == {}  # torch's default off CUDA
    assert fused_kwargs([], clipping=False) == {}


def test_clipping_under_mixed_precision_trains_with_parameters_that_look_like_cuda(monkeypatch):
    """Lightning's MixedPrecision.clip_gradients raises for a fused optimizer (bf16-mixed too); fused SGD
    runs on the CPU as well, so with ``is_cuda`` true for every tensor the GPU's first step runs here."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    torch.manual_seed(0)
    module = ImageClassifier(
        model={"name": "resnet20"}, optimizer={"name": "sgd", "lr": 0.1}, scheduler={"name": "none"}
    )
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    trainer = pl.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        gradient_clip_val=1.0,
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(x, y, torch.arange(8)), batch_size=4))
    assert trainer.global_step == 2
    assert trainer.optimizers[0].defaults["foreach"] is True and not trainer.optimizers[0].defaults["fused"]


# ---------------------------------------------------------------------------------- data on the device
def _datamodule(root, device: str, **kw) -> CIFAR10DataModule:
    """A data module set up under a Trainer stand-in whose root device is ``device`` (``meta`` stands in for CUDA)."""
    dm = CIFAR10DataModule(
        root=str(root), download=False, strict_sizes=False, val_size=100, batch_size=50, eval_batch_size=100, **kw
    )
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("pin_memory", [True, None])
def test_a_split_on_the_device_is_never_pinned(synthetic_root, pin_memory):
    dm = _datamodule(synthetic_root, "meta", pin_memory=pin_memory, on_device=True)
    assert dm.splits["train"].images.device.type == "meta"  # the split went to the device
    assert dm.train_dataloader().pin_memory is False and dm.val_dataloader().pin_memory is False


def test_host_data_is_pinned_when_asked(synthetic_root):
    assert _datamodule(synthetic_root, "meta", pin_memory=True, on_device=False).train_dataloader().pin_memory
    assert not _datamodule(synthetic_root, "cpu", on_device=False).train_dataloader().pin_memory


def test_per_sample_transforms_keep_a_preprocessing_of_their_own_on_the_cpu(synthetic_root):
    """The prediction grid prepares its images on the training device through transform_batch; the
    torchvision loader's per-sample pipeline (run in forked workers) must not follow it there."""
    dm = _datamodule(synthetic_root, "cpu", loader="torchvision")
    split = dm.splits["val"]
    index = split.indices[:4]
    dm.transform_batch((split.images[index].to("meta"), split.labels[index], index.to("meta")), train=False)
    assert dm.augmenter.preprocess.mean.device.type == "meta"  # the grid's, on the "GPU"
    for name in ("train", "val"):
        x, _, _ = dm.splits[name][0]
        assert x.device.type == "cpu" and x.dtype == torch.float32 and x.shape == (3, 32, 32)


# ------------------------------------------------------------------------------- no collective alone
def test_one_process_under_ddp_never_broadcasts_the_checkpoint_clock(tmp_path, monkeypatch):
    """trainer=ddp on one GPU: a DDPStrategy with world_size 1, whose broadcast is still a collective."""
    from resnet_cifar.training import checkpointing

    def collective(obj):
        raise AssertionError("a collective with one process")

    clock = {"now": 0.0}
    monkeypatch.setattr(checkpointing.time, "monotonic", lambda: clock["now"])
    cb = checkpointing.LastCheckpoint(tmp_path, every_n_minutes=1, every_n_epochs=None)
    trainer = SimpleNamespace(global_step=0, world_size=1, strategy=SimpleNamespace(broadcast=collective))
    cb.on_train_start(trainer, None)
    due = []
    for step in range(1, 3 * checkpointing.CLOCK_EVERY):
        trainer.global_step, clock["now"] = step, 10.0 * step
        if cb._due(trainer):
            due.append(step)
            cb._last_save = clock["now"]
    assert due == [6, 12, 18, 24, 30, 36, 42]  # every minute on the step, not at multiples of CLOCK_EVERY


# ------------------------------------------------------------------------------ EMA without host syncs
class _TwoDtypes(pl.LightningModule):
    """Float parameters and buffers, and an integer buffer: two dtype groups per update."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn = torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)


def test_an_ema_update_reads_nothing_back_from_the_device(monkeypatch):
    """On a GPU every conversion of a tensor to a Python value is a host sync: after the count is read once,
    updates make none (torch's AveragedModel makes ~4: bool(n_averaged == 0), n_averaged > 0, int() per group)."""
    from torch.optim.swa_utils import AveragedModel

    from resnet_cifar.training.ema import EmaUpdate, EMAWeights

    torch.manual_seed(0)
    module, cb = _TwoDtypes(), EMAWeights(decay=0.9, warmup=True)
    reference = AveragedModel(module, multi_avg_fn=EmaUpdate(0.9, warmup=True), use_buffers=True)
    cb.setup(SimpleNamespace(), module, "fit")
    steps = []
    for step in range(1, 7):
        with torch.no_grad():
            for t in (*module.parameters(), *module.buffers()):
                t.add_(torch.randn(t.shape).to(t.dtype) if t.is_floating_point() else 1)
        steps.append([t.clone() for t in (*module.parameters(), *module.buffers())])
        if step == 2:  # from the second update on, any read of a tensor's value fails
            for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
                monkeypatch.setattr(torch.Tensor, name, lambda self, *a, name=name: pytest.fail(f"Tensor.{name}"))
        cb.on_train_batch_end(SimpleNamespace(global_step=step), module, None, None, step - 1)
    monkeypatch.undo()
    assert cb._average_model.count == 6 and int(cb._average_model.n_averaged) == 6
    for values in steps:  # torch's own update on the same values: the same average, bit for bit
        with torch.no_grad():
            for t, v in zip((*module.parameters(), *module.buffers()), values):
                t.copy_(v)
        reference.update_parameters(module)
    for mine, theirs in zip(cb._average_model.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs)
    # a loaded state (a resume) brings its own count
    cb._average_model.load_state_dict({**cb._average_model.state_dict(), "n_averaged": torch.tensor(40)})
    assert cb._average_model.count == 40


# ----------------------------------------------------------------------- a time-critical preset
def test_gpu_3min_writes_one_checkpoint_at_the_end_and_no_figure(synthetic_root, tmp_path, monkeypatch):
    """experiment=gpu_3min, shrunk to the CPU (epochs of 2 batches over a 6-second budget): stopped by its budget,
    no best checkpoint per epoch and no prediction grid; last.ckpt once at the end, and the test runs on the
    final weights."""
    from helpers import compose_cfg, synthetic_overrides

    from resnet_cifar.run import train
    from resnet_cifar.training import checkpointing, prediction_grid

    saves, figures = [], []
    real_save = checkpointing.atomic_torch_save
    monkeypatch.setattr(checkpointing, "atomic_torch_save", lambda obj, p: saves.append(p) or real_save(obj, p))
    monkeypatch.setattr(prediction_grid, "log_figure", lambda *a: figures.append(a))
    shrink = ["data.batch_size=16", "data.on_device=false", "trainer.max_time=00:00:00:06"]
    shrink += ["trainer.max_epochs=-1", "trainer.limit_train_batches=2"]  # the budget ends training
    shrink += ["trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.benchmark=false"]
    cfg = compose_cfg(["experiment=gpu_3min", *synthetic_overrides(synthetic_root), *shrink], tmp_path)
    metrics = train(cfg)
    assert metrics["epochs"] >= 3 and "test/acc" in metrics and metrics["best_ckpt"] == ""
    assert [p.name for p in map(Path, saves)] == ["last.ckpt"] and figures == []
    last = torch.load(saves[0], weights_only=True)
    assert 6 <= last["callbacks"]["Timer"]["time_elapsed"]["train"] <= 6 + 5  # stopped by the budget
