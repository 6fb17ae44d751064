"""A training ``DataLoader`` that resumes mid-epoch at the batch where a run stopped.

Lightning saves and restores the state of a dataloader that has ``state_dict`` /
``load_state_dict`` (its ``_Stateful`` protocol) and then expects the loader to yield
only the batches the epoch has left. :class:`ResumableLoader` counts the batches it has
yielded in the current pass and, after ``load_state_dict``, makes its sampler skip that
many batches, provided the sampler replays the same epoch (see
:class:`~resnet_cifar.data.datamodule.EpochShuffle`, a pure function of seed and epoch).

The iterator is created lazily, at the first ``next()``: Lightning creates the
iterator before it restores a checkpoint and before it calls ``set_epoch``, and a
multi-worker loader draws its whole order (and its worker seeds) when the iterator is
created.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

LOADERS = ("tensor", "torchvision")  # data.loader: the batched uint8 tensor path, torchvision per-sample


class ResumableLoader(DataLoader):
    """``DataLoader`` with ``state_dict() == {"epoch": e, "batches": n}``: ``n`` batches of epoch ``e`` were yielded.

    The sampler must have ``epoch`` and ``skip_next(num_samples)`` (a one-shot skip for
    its next pass); with another sampler (e.g. Lightning's distributed wrapper) the loader
    still works, but restarts the epoch from its first batch.
    """

    _pending: dict[str, int] | None = None
    _epoch: int = 0
    _yielded: int = 0

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        sampler = self.sampler
        epoch = getattr(sampler, "epoch", 0)
        skip = 0
        if self._pending is not None and self._pending.get("epoch") == epoch:
            skip = int(self._pending.get("batches", 0))
            if skip and hasattr(sampler, "skip_next") and self.batch_size:
                sampler.skip_next(skip * self.batch_size)
                log.info("Resuming epoch %d at batch %d", epoch, skip)
            elif skip:
                log.warning("This sampler cannot skip batches: epoch %d restarts from its first batch", epoch)
                skip = 0
        self._pending = None
        self._epoch, self._yielded = epoch, skip
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Skip ``state["batches"]`` batches on the next pass, if it replays ``state["epoch"]``."""
        self._pending = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}
