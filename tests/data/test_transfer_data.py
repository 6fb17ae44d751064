"""data.classes and data.train_per_class: relabelling, exact seeded budgets, no leakage."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from helpers import compose_cfg

from resnet_cifar.config import validate_train_config
from resnet_cifar.data import cifar10
from resnet_cifar.data.datamodule import CIFAR10DataModule
from resnet_cifar.data.splits import per_class_budget, select_classes
from resnet_cifar.errors import ConfigError

VAL = 100  # of the synthetic set's 500 training images: 40 per class stay in the training split


def make_dm(root, **kw) -> CIFAR10DataModule:
    dm = CIFAR10DataModule(root=str(root), download=False, strict_sizes=False, val_size=VAL, **kw)
    dm.setup()
    return dm


def split_indices(dm: CIFAR10DataModule) -> dict[str, torch.Tensor]:
    return {k: ds.indices for k, ds in dm.splits.items()}


def raw(root):
    folder = root / "cifar-10-batches-py"
    return (
        cifar10.read_split(folder, cifar10.TRAIN_FILES, None),
        cifar10.read_split(folder, cifar10.TEST_FILES, None),
    )


def test_select_classes_relabels_in_given_order():
    labels = torch.tensor([0, 7, 2, 5, 7, 9, 2])
    keep, mapped = select_classes(labels, [7, 2, 5])
    assert keep.tolist() == [1, 2, 3, 4, 6]
    assert mapped[keep].tolist() == [0, 1, 2, 0, 1]


def test_class_subset_relabels_every_split_and_keeps_names(synthetic_root):
    classes = [7, 2, 5]
    full, dm = make_dm(synthetic_root), make_dm(synthetic_root, classes=classes)
    train, test = raw(synthetic_root)
    assert dm.num_classes == 3
    assert dm.class_names == ["horse", "bird", "dog"]
    chosen = torch.tensor(classes)
    for name, ds in dm.splits.items():
        source = test if name == "test" else train
        ref = full.splits[name].indices
        # every image of a chosen class, and nothing else, relabelled to its position in `classes`
        assert torch.equal(ds.indices, ref[torch.isin(source.labels[ref], chosen)]), name
        assert [classes[int(y)] for y in ds.labels[ds.indices]] == source.labels[ds.indices].tolist(), name
        assert set(ds.labels[ds.indices].tolist()) == {0, 1, 2}, name
    # a batch leaves the module with the new labels
    images, labels = dm.transform_batch(dm.splits["val"].__getitems__(list(range(8))), train=False)
    assert images.shape[0] == 8 and int(labels.max()) <= 2


def test_budget_is_exact_per_class_and_seeded(synthetic_root):
    a = make_dm(synthetic_root, classes=[5, 6, 7, 8, 9], train_per_class=7, split_seed=3)
    b = make_dm(synthetic_root, classes=[5, 6, 7, 8, 9], train_per_class=7, split_seed=3, seed=99)
    c = make_dm(synthetic_root, classes=[5, 6, 7, 8, 9], train_per_class=7, split_seed=4)
    train_labels = a.splits["train"].labels[a.splits["train"].indices]
    assert Counter(train_labels.tolist()) == {k: 7 for k in range(5)}
    assert torch.equal(a.splits["train"].indices, b.splits["train"].indices)  # the shuffle seed plays no part
    assert not torch.equal(a.splits["train"].indices, c.splits["train"].indices)


def test_budget_draws_only_from_the_training_split(synthetic_root):
    budget = make_dm(synthetic_root, classes=[0, 1, 2], train_per_class=10)
    full = make_dm(synthetic_root, classes=[0, 1, 2])
    got, ref = split_indices(budget), split_indices(full)
    assert torch.isin(got["train"], ref["train"]).all()
    assert not torch.isin(got["train"], ref["val"]).any()
    # validation and test stay complete for the chosen classes
    assert torch.equal(got["val"], ref["val"]) and torch.equal(got["test"], ref["test"])
    # the same budget per class whichever classes come along
    alone = make_dm(synthetic_root, classes=[0, 1], train_per_class=10)
    assert len(alone.splits["train"]) == 20


def test_budget_larger_than_a_class_is_refused(synthetic_root):
    with pytest.raises(ConfigError, match=r"train_per_class=41 exceeds .* lower it"):
        make_dm(synthetic_root, train_per_class=41)


def test_per_class_budget_function():
    labels = torch.arange(100) % 4
    pool = torch.arange(0, 100, 2)  # only classes 0 and 2, 25 each
    got = per_class_budget(labels, pool, 5, seed=0)
    assert torch.isin(got, pool).all() and Counter(labels[got].tolist()) == {0: 5, 2: 5}
    assert torch.equal(got, per_class_budget(labels, pool, 5, seed=0))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["data.classes=[3]"], "data.classes"),
        (["data.classes=[1,1]"], "data.classes"),
        (["data.classes=[0,10]"], "data.classes"),
        (["data.train_per_class=0"], "data.train_per_class"),
    ],
)
def test_bad_subset_options_are_config_errors(overrides, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        validate_train_config(compose_cfg(overrides, tmp_path))
