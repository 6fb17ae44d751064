"""CIFAR-10 reading, validation, splits and the DataModule."""

from __future__ import annotations

import pickle
import re
import urllib.error

import numpy as np
import pytest
import torch
from helpers import compose_cfg

from resnet_cifar.config import validate_train_config
from resnet_cifar.data import cifar10
from resnet_cifar.data.datamodule import CIFAR10DataModule
from resnet_cifar.data.splits import stratified_kfold, stratified_split
from resnet_cifar.errors import ConfigError, DataError


def make_dm(root, **kw) -> CIFAR10DataModule:
    args = dict(root=str(root), download=False, val_size=100, batch_size=50, eval_batch_size=100, strict_sizes=False)
    dm = CIFAR10DataModule(**{**args, **kw})
    dm.setup("fit")
    return dm


def test_synthetic_roundtrip(synthetic_root):
    train, test = (
        cifar10.read_split(synthetic_root / cifar10.FOLDER, cifar10.TRAIN_FILES),
        cifar10.read_split(synthetic_root / cifar10.FOLDER, cifar10.TEST_FILES),
    )
    assert train.images.shape == (500, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.labels.shape == (100,) and test.labels.dtype == torch.int64
    assert set(train.labels.tolist()) == set(range(10))


def test_strict_sizes_rejects_a_partial_dataset(synthetic_root):
    with pytest.raises(DataError, match="expected 50000"):
        cifar10.load_cifar10(synthetic_root, download=False)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, "expected uint8 of shape"),
        ({b"data": np.zeros((4, 3072), np.float32), b"labels": [0, 1, 2, 3]}, "expected uint8"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}, "labels range 0..10"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1]}, "2 labels for 4 images"),
        ({b"labels": [0]}, "no 'data' and 'labels'"),
    ],
)
def test_malformed_batches_are_reported(tmp_path, entry, message):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(DataError, match=message):
        cifar10.read_split(tmp_path, ("data_batch_1",))


def test_truncated_batch_is_reported(tmp_path, synthetic_root):
    good = (synthetic_root / cifar10.FOLDER / "test_batch").read_bytes()
    (tmp_path / "test_batch").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="unreadable or truncated"):
        cifar10.read_split(tmp_path, ("test_batch",))


def test_missing_data_without_download_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match=r"cifar-10-batches-py lacks data_batch_1.*set data.download=true"):
        cifar10.ensure_dataset(tmp_path, download=False)


def test_failed_download_says_where_to_put_the_files(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(DataError, match=r"download failed.*unpack it so that the batches are at"):
        cifar10.ensure_dataset(tmp_path, download=True)


def test_stratified_split_sizes_disjoint_seeded():
    labels = torch.arange(1000) % 10
    train, val = stratified_split(labels, 100, seed=3)
    assert len(train) == 900 and len(val) == 100
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(1000))
    assert torch.bincount(labels[val], minlength=10).tolist() == [10] * 10
    again = stratified_split(labels, 100, seed=3)
    other = stratified_split(labels, 100, seed=4)
    assert torch.equal(val, again[1])
    assert not torch.equal(val, other[1])


def test_stratified_split_rounds_to_the_exact_size():
    labels = torch.tensor([0] * 7 + [1] * 5 + [2] * 3)
    train, val = stratified_split(labels, 4, seed=0)
    assert len(val) == 4 and len(train) == 11


def test_kfold_partitions_the_images_stratified_and_seeded():
    """Uneven classes (103, 57, 40 images), 5 folds: every image in exactly one fold, each class spread
    evenly over the folds, the folds' sizes within one, the same folds for the same seed."""
    shuffle = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0] * 103 + [1] * 57 + [2] * 40)[shuffle]
    folds = [stratified_kfold(labels, 5, i, seed=3) for i in range(5)]
    vals = [val.tolist() for _, val in folds]
    assert sorted(i for val in vals for i in val) == list(range(200))  # a partition
    for train, val in folds:  # the other folds are the training images
        assert sorted(train.tolist() + val.tolist()) == list(range(200)) and not set(train.tolist()) & set(val.tolist())
        assert train.tolist() == sorted(train.tolist()) and val.tolist() == sorted(val.tolist())
    assert {len(v) for v in vals} == {40}
    per_class = torch.stack([torch.bincount(labels[val], minlength=3) for _, val in folds])  # fold x class
    assert per_class.sum(0).tolist() == [103, 57, 40]
    assert (per_class.max(0).values - per_class.min(0).values).tolist() == [1, 1, 0]  # 20.6, 11.4, 8 per fold
    again = [stratified_kfold(labels, 5, i, seed=3)[1] for i in range(5)]
    assert all(torch.equal(a, b) for a, (_, b) in zip(again, folds, strict=True))
    assert not torch.equal(stratified_kfold(labels, 5, 0, seed=4)[1], folds[0][1])
    with pytest.raises(ConfigError, match=r"data.fold=5 must be in \[0, 4\]"):
        stratified_kfold(labels, 5, 5, seed=3)


def test_datamodule_validates_on_a_fold_with_classes_and_budget(synthetic_root):
    """The fold replaces the hold-out split; a class subset and a label budget still apply, the test set stays."""
    full = make_dm(synthetic_root, num_folds=5, fold=2)
    labels = full.splits["train"].labels
    _, fold_idx = stratified_kfold(labels, 5, 2, seed=0)
    assert torch.equal(full.splits["val"].indices, fold_idx) and len(full.splits["train"]) == 400
    assert len(full.splits["test"]) == 100
    dm = make_dm(synthetic_root, num_folds=5, fold=2, classes=[1, 3, 5], train_per_class=20)
    val, train = dm.splits["val"].indices, dm.splits["train"].indices
    assert torch.equal(val, fold_idx[torch.isin(labels[fold_idx], torch.tensor([1, 3, 5]))])
    assert not set(train.tolist()) & set(fold_idx.tolist())
    assert torch.bincount(dm.splits["train"].labels[train]).tolist() == [20, 20, 20]  # relabelled 0..2
    assert len(dm.splits["test"]) == int(torch.isin(full.splits["test"].labels, torch.tensor([1, 3, 5])).sum())


def test_datamodule_split_and_batches(synthetic_root):
    dm = make_dm(synthetic_root)
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [400, 100, 100]
    assert not set(dm.splits["train"].indices.tolist()) & set(dm.splits["val"].indices.tolist())
    x, y, idx = next(iter(dm.train_dataloader()))
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.uint8 and y.shape == (50,) and idx.shape == (50,)
    assert torch.equal(dm.splits["train"].labels[idx], y)


def test_datamodule_is_deterministic_with_a_seed(synthetic_root):
    a = next(iter(make_dm(synthetic_root, seed=1).train_dataloader()))[2]
    b = next(iter(make_dm(synthetic_root, seed=1).train_dataloader()))[2]
    c = next(iter(make_dm(synthetic_root, seed=2).train_dataloader()))[2]
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the split does not depend on the shuffling seed
    assert torch.equal(
        make_dm(synthetic_root, seed=1).splits["val"].indices, make_dm(synthetic_root, seed=2).splits["val"].indices
    )


def test_validation_batches_are_normalised_not_augmented(synthetic_root):
    dm = make_dm(synthetic_root, augment={"crop_padding": 4, "flip": True, "cutout": 8})
    raw = next(iter(dm.val_dataloader()))
    x, y = dm.transform_batch(raw, train=False)
    mean = torch.tensor(dm.hparams.mean).view(1, 3, 1, 1)
    std = torch.tensor(dm.hparams.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (raw[0].float() / 255 - mean) / std)
    xt, _ = dm.transform_batch(raw, train=True)
    assert not torch.allclose(xt, x)


def test_torchvision_loader_matches_tensor_loader_without_augmentation(synthetic_root):
    no_aug = {"crop_padding": 0, "flip": False}
    tv = make_dm(synthetic_root, loader="torchvision", augment=no_aug)
    tensor = make_dm(synthetic_root, loader="tensor", augment=no_aug)
    xt, yt, _ = next(iter(tv.val_dataloader()))
    xr, yr = tensor.transform_batch(next(iter(tensor.val_dataloader())), train=False)
    torch.testing.assert_close(xt, xr, atol=1e-5, rtol=0)
    assert torch.equal(yt, yr)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.loader=dali"], "data.loader='dali': expected one of tensor, torchvision"),
        (["data.batch_size=0"], "data.batch_size=0: expected an integer in [1, 65536]"),
        (["data.val_size=60000"], "data.val_size=60000"),
        (["data.augment.autoaugment=true"], "needs the per-sample pipeline"),
        (["+data.augment.rotate=5"], "data.augment.rotate is not a known key"),
        (["data.classes=[3]"], "data.classes"),
        (["data.num_folds=1", "data.fold=0"], "data.num_folds=1: expected a number in [2, 1000]"),
        (["data.num_folds=5"], "data.num_folds=5 needs data.fold: the fold to validate on, 0..4"),
        (["data.fold=0"], "data.fold=0 needs data.num_folds=K"),
        (["data.num_folds=5", "data.fold=5"], "data.fold=5 must be < data.num_folds=5 (the folds are 0..4)"),
    ],
)
def test_bad_data_config(overrides, message, tmp_path):
    """The schema and the cross-field rules catch bad data settings before anything is loaded."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_train_config(compose_cfg(overrides, tmp_path))


def test_real_cifar10_loads_and_validates(real_root):
    train, test = cifar10.load_cifar10(real_root, download=False)
    assert train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert test.labels[:5].tolist() == [3, 8, 8, 0, 6]
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    # the normalisation constants are the training set's channel statistics
    mean = [train.images[:, c].double().mean().item() / 255 for c in range(3)]
    std = [train.images[:, c].double().std().item() / 255 for c in range(3)]
    assert mean == pytest.approx([0.4914, 0.4822, 0.4465], abs=1e-3)
    assert std == pytest.approx([0.2470, 0.2435, 0.2616], abs=1e-3)


def test_real_datamodule_default_split(real_root):
    dm = CIFAR10DataModule(root=str(real_root), download=False)
    dm.setup("fit")
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [45000, 5000, 10000]
    val_labels = dm.splits["val"].labels[dm.splits["val"].indices]
    assert torch.bincount(val_labels).tolist() == [500] * 10
