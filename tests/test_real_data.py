"""Short runs on the real shared CIFAR-10: learning must happen."""

from __future__ import annotations

from helpers import compose_cfg

from resnet_cifar.run import train


def test_resnet20_learns_real_cifar10(real_root, tmp_path):
    """150 SGD steps on 2,500 real images: test accuracy far above the 10% of chance."""
    cfg = compose_cfg(
        [
            f"data.root={real_root}",
            "data.train_per_class=250",
            "data.batch_size=50",
            "trainer.accelerator=cpu",
            "trainer.max_epochs=3",
            "trainer.limit_val_batches=2",
            "trainer.limit_test_batches=4",
            "scheduler.warmup_epochs=0.5",
            "~callbacks.progress_bar",
            "~callbacks.model_summary",
            "logger=csv",
        ],
        tmp_path,
    )
    metrics = train(cfg)
    assert metrics["test/acc"] > 0.25, metrics
    assert metrics["train/loss"] < 2.0, metrics
