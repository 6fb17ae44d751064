"""The CIFAR-10 ``LightningDataModule``: split, loaders and augmentation.

Two loaders share one split:

- ``loader="tensor"`` (default): the split stays as uint8 tensors; a batch is one indexing
  operation (``__getitems__``), and augmentation plus normalisation run on the training
  device in :meth:`CIFAR10DataModule.on_after_batch_transfer`.
- ``loader="torchvision"``: per-sample ``torchvision.transforms.v2`` pipelines in
  DataLoader workers, for augmentations the tensor path lacks (colour jitter,
  AutoAugment, random erasing) and for comparison.

Every batch leaves the DataModule as ``(images, labels)`` with normalised float images.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from resnet_cifar.data import cifar10
from resnet_cifar.data.augment import BatchAugment
from resnet_cifar.data.loader import ResumableLoader
from resnet_cifar.data.mixing import BatchMix
from resnet_cifar.data.sharding import eval_sampler, train_sampler
from resnet_cifar.data.splits import per_class_budget, select_classes, stratified_kfold, stratified_split

log = logging.getLogger(__name__)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class IndexedImages(Dataset):
    """Images, labels and their dataset indices, one (transformed) sample at a time."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, transform=None) -> None:
        self.images, self.labels, self.indices = images, labels, indices
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        j = self.indices[i]
        x = self.images[j]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[j], j


class BatchedImages(IndexedImages):
    """The tensor loader's dataset: a whole batch is fetched in one indexing operation."""

    def __getitems__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        j = self.indices[torch.as_tensor(idx, dtype=torch.long)]  # the indices stay on the host
        if self.images.device.type == "cuda":  # data.on_device: an asynchronous copy, no sync per batch
            j = j.pin_memory().to(self.images.device, non_blocking=True)
        elif self.images.device != j.device:
            j = j.to(self.images.device)
        return self.images[j], self.labels[j], j


def _as_batch(batch: Any) -> Any:
    """``collate_fn`` for :class:`BatchedImages`: the batch is already stacked."""
    return batch


class EpochShuffle(Sampler[int]):
    """A permutation that is a function of ``(seed, epoch)`` only, so resumes replay it."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:  # called by Lightning at each epoch start
        self.epoch = epoch

    def skip_next(self, num_samples: int) -> None:
        """Start the next pass ``num_samples`` into the permutation (a mid-epoch resume)."""
        self._skip = num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        skip, self._skip = self._skip, 0
        return iter(torch.randperm(self.n, generator=g)[skip:].tolist())

    def __len__(self) -> int:
        return self.n


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 with the official test set and a seeded, stratified validation split.

    Args:
        root: folder that holds (or will hold) ``cifar-10-batches-py``.
        download: download the official archive when the files are missing.
        val_size: validation images taken from the 50,000 training images (stratified).
        split_seed: seed of the train/val split and of the label budget.
        seed: seed of shuffling and augmentation.
        batch_size, eval_batch_size: images per batch for training and for val/test.
        loader: ``"tensor"`` or ``"torchvision"`` (see the module docstring).
        num_workers: DataLoader workers (torchvision loader only; the tensor loader needs none).
        pin_memory: pin host batches for asynchronous copies; None: when a CUDA device trains on host data
            (never a split on the device).
        on_device: keep the uint8 split on the training device (tensor loader); None: on a CUDA device.
        mean, std: normalisation statistics.
        image_size: side of the images fed to the model (resized when not 32).
        augment: ``crop_padding``, ``padding_mode``, ``flip``, ``cutout``, (tensor loader only)
            ``alternating_flip``, and (torchvision loader only) ``color_jitter``, ``autoaugment``, ``random_erasing``.
        classes: train and evaluate on these class ids only, relabelled 0..k-1.
        train_per_class: a seeded label budget per class drawn from the training split.
        strict_sizes: require the 50,000/10,000 images of the full dataset.
        num_folds, fold: K-fold cross-validation: validate on fold ``fold`` of a stratified
            ``num_folds``-fold partition of the training images (seeded by ``split_seed``) and
            train on the other folds, instead of the ``val_size`` hold-out; both or neither.
        mixup, cutmix: alpha of MixUp / CutMix on the training batches (0: off; both: one of the two per
            batch), after the augmentation; the labels become soft targets (:class:`~.mixing.BatchMix`).
    """

    def __init__(
        self,
        root: str = "data",
        download: bool = True,
        val_size: int = 5000,
        split_seed: int = 0,
        seed: int = 0,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        loader: str = "tensor",
        num_workers: int = 0,
        pin_memory: bool | None = None,
        on_device: bool | None = None,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        image_size: int = 32,
        augment: dict | None = None,
        classes: Sequence[int] | None = None,
        train_per_class: int | None = None,
        strict_sizes: bool = True,
        num_folds: int | None = None,
        fold: int | None = None,
        mixup: float = 0.0,
        cutmix: float = 0.0,
    ) -> None:
        super().__init__()
        augment = dict(augment or {})
        self.save_hyperparameters(ignore=["root"])
        self.root = root
        aug_defaults = dict(
            crop_padding=4,
            padding_mode="zeros",
            flip=True,
            alternating_flip=False,
            cutout=0,
            color_jitter=0.0,
            autoaugment=False,
            random_erasing=0.0,
        )
        self.augment_cfg = {**aug_defaults, **augment}
        self.class_names = [cifar10.CLASSES[c] for c in classes] if classes else list(cifar10.CLASSES)
        self.num_classes = len(self.class_names)
        self.augmenter = BatchAugment(
            mean,
            std,
            crop_padding=self.augment_cfg["crop_padding"],
            flip=self.augment_cfg["flip"],
            cutout=self.augment_cfg["cutout"],
            image_size=image_size,
            seed=seed,
            alternating_flip=self.augment_cfg["alternating_flip"],
            padding_mode=self.augment_cfg["padding_mode"],
        )
        self.mixer = BatchMix(self.num_classes, mixup, cutmix, seed) if mixup > 0 or cutmix > 0 else None
        self.splits: dict[str, IndexedImages] = {}
        self._train_loader: DataLoader | None = None
        self._train_loader_state: dict[str, int] | None = None

    # ------------------------------------------------------------------ data
    def prepare_data(self) -> None:
        cifar10.ensure_dataset(self.root, self.hparams.download)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        folder = cifar10.ensure_dataset(self.root, hp.download)
        sizes = (cifar10.TRAIN_SIZE, cifar10.TEST_SIZE) if hp.strict_sizes else (None, None)
        train = cifar10.read_split(folder, cifar10.TRAIN_FILES, sizes[0])
        test = cifar10.read_split(folder, cifar10.TEST_FILES, sizes[1])
        if hp.num_folds:
            train_idx, val_idx = stratified_kfold(train.labels, hp.num_folds, hp.fold, hp.split_seed)
        else:
            train_idx, val_idx = stratified_split(train.labels, hp.val_size, hp.split_seed)
        test_idx = torch.arange(len(test))
        train_labels, test_labels = train.labels, test.labels
        if hp.classes:
            keep, train_labels = select_classes(train.labels, list(hp.classes))
            train_idx = train_idx[torch.isin(train_idx, keep)]
            val_idx = val_idx[torch.isin(val_idx, keep)]
            keep_test, test_labels = select_classes(test.labels, list(hp.classes))
            test_idx = keep_test
        if hp.train_per_class:
            train_idx = per_class_budget(train_labels, train_idx, hp.train_per_class, hp.split_seed)
        train_images, test_images = train.images, test.images
        if self._on_device():
            device = self.trainer.strategy.root_device
            train_images, test_images = train_images.to(device), test_images.to(device)
            train_labels, test_labels = train_labels.to(device), test_labels.to(device)
        if hp.loader == "torchvision":
            train_tf, eval_tf = self._per_sample_transforms()
            self.splits = {
                "train": IndexedImages(train_images, train_labels, train_idx, train_tf),
                "val": IndexedImages(train_images, train_labels, val_idx, eval_tf),
                "test": IndexedImages(test_images, test_labels, test_idx, eval_tf),
            }
        else:
            self.splits = {
                "train": BatchedImages(train_images, train_labels, train_idx),
                "val": BatchedImages(train_images, train_labels, val_idx),
                "test": BatchedImages(test_images, test_labels, test_idx),
            }
        log.info(
            "CIFAR-10 from %s: %d train, %d val, %d test images, %d classes%s",
            folder,
            len(train_idx),
            len(val_idx),
            len(test_idx),
            self.num_classes,
            f" (validation: fold {hp.fold} of {hp.num_folds})" if hp.num_folds else "",
        )

    def train_images(self, n: int) -> torch.Tensor:
        """The first ``n`` training images (in split order), normalised as the model sees them, unaugmented.

        What data-dependent initialisations read (``model.stem=whiten``: :class:`~resnet_cifar.models.resnet9.
        PatchWhitening`): a function of the split only, so every process and every run of a seed gets the same.
        """
        split = self.splits["train"]
        return self.augmenter.normalize(split.images[split.indices[:n].to(split.images.device)])

    def _on_device(self) -> bool:
        """``data.on_device`` (tensor loader, under a Trainer); None: on a CUDA device (150 MB of uint8 images)."""
        if self.hparams.loader != "tensor" or self.trainer is None:
            return False
        if self.hparams.on_device is not None:
            return bool(self.hparams.on_device)
        return self.trainer.strategy.root_device.type == "cuda"

    def _per_sample_transforms(self):
        from torchvision.transforms import v2

        a = self.augment_cfg
        # The same resize and normalisation as the tensor loader, in a copy of their own on the CPU: the
        # augmenter's follows the batches it is given to the GPU (the prediction grid's transform_batch), and
        # DataLoader workers forked after that would inherit its CUDA buffers.
        finish = [copy.deepcopy(self.augmenter.preprocess).cpu()]
        train = []
        if a["crop_padding"]:
            mode = {"zeros": "constant"}.get(a["padding_mode"], a["padding_mode"])  # torchvision's name of zeros
            train.append(v2.RandomCrop(32, padding=a["crop_padding"], padding_mode=mode))
        if a["flip"]:
            train.append(v2.RandomHorizontalFlip())
        if a["autoaugment"]:
            train.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10))
        if a["color_jitter"]:
            cj = a["color_jitter"]
            train.append(v2.ColorJitter(brightness=cj, contrast=cj, saturation=cj))
        train += finish
        if a["cutout"]:
            area = (a["cutout"] / 32) ** 2
            train.append(v2.RandomErasing(p=1.0, scale=(area, area), ratio=(1.0, 1.0)))
        if a["random_erasing"]:
            train.append(v2.RandomErasing(p=a["random_erasing"]))
        return v2.Compose(train), v2.Compose(finish)

    # ----------------------------------------------------------- dataloaders
    def _loader(self, split: str) -> DataLoader:
        hp = self.hparams
        ds = self.splits[split]
        train = split == "train"
        batch_size = hp.batch_size if train else hp.eval_batch_size
        # Training: EpochShuffle, dealt out to the ranks in turn under DDP (set_epoch forwarded), so N processes
        # train on the single-process batches of N * batch_size; the resumable loader restarts mid-epoch at
        # the right batch. Evaluation: an un-padded shard per rank, so multi-process metrics equal single-process
        # ones. (data/sharding.py)
        if train:
            sampler = train_sampler(EpochShuffle(len(ds), hp.seed), self.trainer)
        else:
            sampler = eval_sampler(ds, self.trainer)
        loader_cls = ResumableLoader if train else DataLoader
        if hp.loader == "tensor":
            return loader_cls(
                ds,
                batch_size=batch_size,
                sampler=sampler,
                drop_last=train,
                collate_fn=_as_batch,
                pin_memory=self._pin(),
            )
        return loader_cls(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=train,
            num_workers=hp.num_workers,
            pin_memory=self._pin(),
            persistent_workers=hp.num_workers > 0,
        )

    def _pin(self) -> bool:
        """``data.pin_memory``; null: pin host batches bound for a CUDA device (asynchronous copies).

        Never a split that is already on the device (``data.on_device``): the DataLoader would pin its
        CUDA batches and fail ("cannot pin 'torch.cuda.ByteTensor'"), whatever ``data.pin_memory`` says.
        """
        if self.splits["train"].images.device.type != "cpu":
            return False
        if self.hparams.pin_memory is not None:
            return bool(self.hparams.pin_memory)
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def train_dataloader(self) -> DataLoader:
        self._train_loader = self._loader("train")
        self._apply_train_loader_state()
        return self._train_loader

    # Lightning restores a stateful train loader itself, except when the loader was requested
    # before the checkpoint was restored (``trainer.estimated_stepping_batches`` in
    # ``configure_optimizers``, Lightning issue #20550): the DataModule's state covers that case.
    def state_dict(self) -> dict[str, Any]:
        loader = self._train_loader
        return {"train_loader": loader.state_dict()} if isinstance(loader, ResumableLoader) else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_loader_state = state_dict.get("train_loader")
        self._apply_train_loader_state()

    def _apply_train_loader_state(self) -> None:
        if self._train_loader_state is not None and isinstance(self._train_loader, ResumableLoader):
            self._train_loader.load_state_dict(self._train_loader_state)
            self._train_loader_state = None

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> tuple[torch.Tensor, ...]:
        """``(images, labels, index)``: the index (position in the split) lets the report name images.

        With ``mixup``/``cutmix``, training batches leave with soft targets ``(B, num_classes)`` as labels.
        """
        images, labels, index = batch
        training = self.trainer is not None and self.trainer.training
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        if images.dtype == torch.uint8:  # tensor loader: augment and normalise on the device
            self.augmenter.preprocess.to(images.device)  # once: its statistics follow the batches
            images = self.augmenter(images, index, epoch, train=training)
        if training and self.mixer is not None:  # both loaders; the batch's number within the epoch, resumed too
            images, labels = self.mixer(
                images, labels, epoch, self.trainer.fit_loop.epoch_loop.batch_progress.current.ready
            )
        return images, labels, index

    def transform_batch(self, batch: Any, train: bool, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalise (and, if ``train``, augment) a raw batch outside a Trainer."""
        images, labels, index = batch
        if images.dtype == torch.uint8:
            images = self.augmenter(images, index, epoch, train=train)
        return images, labels
