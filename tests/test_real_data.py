"""Short runs on the real shared CIFAR-10: learning must happen, and the evaluation report over
the full 10,000-image test set is the same on 1 and 2 processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import compose_cfg, run_script

from resnet_cifar.run import train


@pytest.fixture(scope="module")
def learned(real_root, tmp_path_factory) -> tuple[dict, Path]:
    """150 SGD steps on 2,500 real images; the metrics and the run directory."""
    run_dir = tmp_path_factory.mktemp("real_run")
    cfg = compose_cfg(
        [
            f"data.root={real_root}",
            "data.train_per_class=250",
            "data.batch_size=50",
            "trainer.accelerator=cpu",
            "trainer.max_epochs=3",
            "trainer.limit_val_batches=2",
            "trainer.limit_test_batches=4",
            "scheduler=cosine",
            "scheduler.warmup_epochs=0.5",
            "module.compile=false",  # ~1 min of compilation; compile has tests of its own
            "module.tta_translate=0",  # flip TTA: 2 views of the 10,000 test images per evaluation, not 6
            "~callbacks.progress_bar",
            "~callbacks.model_summary",
            "logger=csv",
        ],
        run_dir,
    )
    return train(cfg), run_dir


def test_resnet20_learns_real_cifar10(learned):
    """Test accuracy far above the 10% of chance after 150 steps."""
    metrics, _ = learned
    assert metrics["test/acc"] > 0.25, metrics
    assert metrics["train/loss"] < 2.0, metrics


def _eval(ckpt: str, real_root: Path, cwd: Path, *overrides: str) -> dict:
    r = run_script("eval.py", f"ckpt_path={ckpt}", f"data.root={real_root}", "tta_flip=false", *overrides, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(next((cwd / "logs" / "eval" / "runs").glob("*/metrics.json")).read_text())


def test_ddp_report_over_the_full_test_set_equals_one_process(learned, real_root, tmp_path):
    """2 processes (gloo) each test half of the 10,000 images; the report, accumulated in the test
    loop and synchronised, covers all of them and equals the single-process evaluation."""
    metrics, _ = learned
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = _eval(metrics["best_ckpt"], real_root, tmp_path / "one")
    two = _eval(metrics["best_ckpt"], real_root, tmp_path / "two", "trainer=ddp_cpu")
    r1, r2 = one["report"], two["report"]
    assert r1["num_images"] == r2["num_images"] == 10_000
    assert r2["top1"] == pytest.approx(two["test/acc"], abs=1e-7)  # the report is over what test/acc counts
    assert sum(map(sum, r2["confusion_matrix"])) == 10_000
    assert r2["confusion_matrix"] == r1["confusion_matrix"]
    assert two["test/acc"] == one["test/acc"]
    for key in ("top1", "top5", "ece", "nll", "macro_f1"):
        assert r2[key] == pytest.approx(r1[key], abs=1e-6), key
    assert r2["reliability"]["count"] == r1["reliability"]["count"]


def test_fast94_recipe_learns_real_cifar10(real_root, tmp_path):
    """experiment=fast94 (airbench94's recipe: whitening stem fitted on these images, Muon, translate TTA) on
    4 epochs of 2,500 real images (76 steps): far above the 10% of chance."""
    cfg = compose_cfg(
        [
            "experiment=fast94",
            f"data.root={real_root}",
            "data.train_per_class=250",
            "data.batch_size=128",
            "trainer.accelerator=cpu",
            "trainer.max_epochs=4",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=2",
            "report=none",
            "logger=none",
            "~callbacks.progress_bar",
            "~callbacks.model_summary",
        ],
        tmp_path,
    )
    metrics = train(cfg)
    assert metrics["epochs"] == 4
    assert metrics["test/acc"] > 0.3, metrics
