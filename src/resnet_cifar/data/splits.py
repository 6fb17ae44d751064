"""Seeded, stratified index selection: train/val split, K-fold cross-validation, class subsets, label budgets."""

from __future__ import annotations

import torch

from resnet_cifar.errors import ConfigError


def _per_class_permutations(labels: torch.Tensor, seed: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        out[c] = idx[torch.randperm(len(idx), generator=g)]
    return out


def stratified_split(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (train, val) with class proportions kept in ``val``.

    Each class gets ``val_size * n_c / n`` validation images, rounded by largest remainder
    so that the sizes add up exactly. Both index tensors are sorted.
    """
    n = len(labels)
    if not 0 <= val_size < n:
        raise ConfigError(f"data.val_size={val_size} must be in [0, {n - 1}] for {n} training images")
    perms = _per_class_permutations(labels, seed)
    exact = {c: val_size * len(p) / n for c, p in perms.items()}
    take = {c: int(v) for c, v in exact.items()}
    for c in sorted(exact, key=lambda c: (take[c] - exact[c], c))[: val_size - sum(take.values())]:
        take[c] += 1
    val = torch.cat([p[: take[c]] for c, p in perms.items()]) if perms else torch.empty(0, dtype=torch.long)
    train = torch.cat([p[take[c] :] for c, p in perms.items()]) if perms else torch.empty(0, dtype=torch.long)
    return train.sort().values, val.sort().values


def stratified_kfold(labels: torch.Tensor, num_folds: int, fold: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (train, val) where ``val`` is fold ``fold`` of a stratified ``num_folds``-fold partition.

    The images of each class, in a seeded order (the same per-class permutations as
    :func:`stratified_split`), are dealt out to the folds in turn, one class after the other:
    every fold gets ``n_c / num_folds`` images of each class (rounded up or down), the folds'
    sizes differ by at most one, and together the folds are every index exactly once. The
    partition depends on ``seed`` and the labels only, so fold ``i`` of every run with the same
    ``data.split_seed`` is the same set. Both index tensors are sorted. (Written here rather than
    taken from scikit-learn's ``StratifiedKFold``: the project does not depend on scikit-learn,
    and this keeps one seeded generator for every split.)
    """
    n = len(labels)
    if not 2 <= num_folds <= n:
        raise ConfigError(f"data.num_folds={num_folds} must be in [2, {n}] for {n} training images")
    if not 0 <= fold < num_folds:
        raise ConfigError(f"data.fold={fold} must be in [0, {num_folds - 1}] for data.num_folds={num_folds}")
    perms = _per_class_permutations(labels, seed)
    order = torch.cat(list(perms.values()))
    in_fold = torch.arange(n) % num_folds == fold
    return order[~in_fold].sort().values, order[in_fold].sort().values


def per_class_budget(labels: torch.Tensor, indices: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Draw ``per_class`` indices of each class from ``indices`` (seeded, sorted result)."""
    perms = _per_class_permutations(labels[indices], seed)
    short = {c: len(p) for c, p in perms.items() if len(p) < per_class}
    if short:
        raise ConfigError(
            f"data.train_per_class={per_class} exceeds the training images of classes "
            f"{short} (class: available); lower it or set it to null for all"
        )
    return indices[torch.cat([p[:per_class] for p in perms.values()])].sort().values


def select_classes(labels: torch.Tensor, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the images whose label is in ``classes``, and labels remapped to 0..k-1."""
    size = max([*classes, int(labels.max()) if len(labels) else 0]) + 1
    lut = torch.full((size,), -1, dtype=torch.long)
    lut[torch.tensor(classes, dtype=torch.long)] = torch.arange(len(classes))
    mapped = lut[labels]
    keep = torch.nonzero(mapped >= 0).flatten()
    return keep, mapped
