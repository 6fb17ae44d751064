"""Fixtures: a small synthetic CIFAR-10 in the real on-disk format, the real copy, isolated user caches.

The helpers they use, and that tests import, are in ``helpers.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import N_TEST, N_TRAIN, REAL_DATA, synthetic_split

from resnet_cifar.data.cifar10 import write_batches


@pytest.fixture(autouse=True, scope="session")
def _isolated_user_caches(tmp_path_factory):
    """No test reads or writes the user's caches: torch hub weights, matplotlib, XDG caches."""
    home = tmp_path_factory.mktemp("user_caches")
    saved = {k: os.environ.get(k) for k in ("TORCH_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR")}
    os.environ.update(TORCH_HOME=str(home / "torch"), XDG_CACHE_HOME=str(home / "xdg"), MPLCONFIGDIR=str(home / "mpl"))
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A data root with cifar-10-batches-py holding 500 train and 100 test images."""
    root = tmp_path_factory.mktemp("synthetic_cifar")
    write_batches(root, synthetic_split(N_TRAIN, 0), synthetic_split(N_TEST, 1))
    return root


@pytest.fixture(scope="session")
def real_root() -> Path:
    if not (REAL_DATA / "cifar-10-batches-py" / "test_batch").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"the real CIFAR-10 copy is missing at {REAL_DATA} (set RESNET_CIFAR_DATA)")
        pytest.skip(f"real CIFAR-10 not found at {REAL_DATA}")
    return REAL_DATA
