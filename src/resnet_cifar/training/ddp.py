"""Distributed data parallel training: a DDP strategy that knows the freeze schedule.

(How the LR grows with the number of processes is in :mod:`resnet_cifar.training.optim`.)

``stage=finetune`` runs the backbone under ``no_grad`` while it is frozen, so its parameters
(which still require gradients: they join the optimizer at the unfreeze epoch) produce no
gradients. Plain DDP would wait for them and fail at the next step. Instead of
``find_unused_parameters=True`` (a search of the autograd graph at every step of the whole
run, and an all-reduce of the backbone's zero gradients while it is frozen), the strategy
below leaves the frozen parameters out of DDP and wraps the module again, with them, at the
first step of the unfreeze epoch. The decision is a function of the epoch, so every rank
re-wraps at the same step, and a resumed run wraps for the epoch it resumes in.
"""

from __future__ import annotations

import logging
from typing import Any

from pytorch_lightning.strategies import DDPStrategy
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel

from resnet_cifar.errors import ConfigError

log = logging.getLogger(__name__)


def _in_hydra_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover
        return False
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class FreezeAwareDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` that excludes the parameters frozen this epoch from gradient sync.

    The LightningModule names them through ``frozen_parameter_names()`` (fully qualified names,
    as in ``named_parameters()``); a module without that method is wrapped like plain DDP.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._excluded: frozenset[str] = frozenset()

    @staticmethod
    def _frozen_names(module: Module | None) -> frozenset[str]:
        names = getattr(module, "frozen_parameter_names", None)
        return frozenset(names()) if callable(names) else frozenset()

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        env = self.cluster_environment
        if self.num_processes > 1 and _in_hydra_multirun() and env is not None and not env.creates_processes_externally:
            # Lightning would re-run this process's command line (the whole sweep) in each child.
            raise ConfigError(
                f"trainer.devices={self.num_processes} starts its own processes, which a local Hydra multirun "
                "cannot do: run each job on its own (no -m), or launch the sweep on SLURM with "
                "hydra/launcher=slurm (one task per device)"
            )

    def setup_environment(self) -> None:
        super().setup_environment()
        if self.global_rank != 0:
            # Every rank runs the same entry script under Hydra, which logs to <run dir>/<task>.log:
            # that file is rank zero's; the other ranks keep their console output only.
            root = logging.getLogger()
            for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
                root.removeHandler(handler)
                handler.close()

    def _setup_model(self, model: Module) -> DistributedDataParallel:
        self._excluded = self._frozen_names(model)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(self._excluded))
        return super()._setup_model(model)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if not isinstance(self.model, DistributedDataParallel):
            return
        frozen = self._frozen_names(self.lightning_module)
        if frozen != self._excluded:
            log.info(
                "Epoch %d: re-wrapping DDP (%d parameters excluded from gradient sync, was %d)",
                self.lightning_module.current_epoch,
                len(frozen),
                len(self._excluded),
            )
            self.model = self._setup_model(self.lightning_module)
            self._register_ddp_hooks()
