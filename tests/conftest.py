"""Fixtures: a small synthetic CIFAR-10 in the real on-disk format, the real copy, isolated user caches.

The helpers they use, and that tests import, are in ``helpers.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import N_TEST, N_TRAIN, REAL_DATA, synthetic_split

from resnet_cifar.data.cifar10 import write_batches


def _share_the_cpus_between_workers() -> None:
    """Under pytest-xdist (``-n auto``), each worker and the scripts it starts use its share of
    the CPUs: torch's default of one thread per CPU in every worker would oversubscribe the
    cores, and OpenMP threads spinning on a busy core slow everyone down. Lightning's CPU DDP
    keeps an ``OMP_NUM_THREADS`` that is set, so its processes get one thread each."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cpus // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


_share_the_cpus_between_workers()


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
