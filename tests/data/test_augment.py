"""The tensor data path: BatchAugment and the DataModule's on-device augmentation."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from resnet_cifar.data.augment import BatchAugment
from resnet_cifar.data.datamodule import CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule, EpochShuffle

PAD = 4


def _images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _aug(**kw) -> BatchAugment:
    return BatchAugment(CIFAR10_MEAN, CIFAR10_STD, **{"crop_padding": PAD, "flip": True, "seed": 0, **kw})


def _windows(image: torch.Tensor, pad: int) -> dict[tuple[int, int, bool], torch.Tensor]:
    """Every (dy, dx, mirrored) crop of the zero-padded image."""
    padded = F.pad(image, (pad, pad, pad, pad))
    h, w = image.shape[-2:]
    out = {}
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            win = padded[:, dy : dy + h, dx : dx + w]
            out[(dy, dx, False)] = win
            out[(dy, dx, True)] = win.flip(-1)
    return out


def _which_window(aug: BatchAugment, images: torch.Tensor, index: torch.Tensor, epoch: int = 0):
    """For each augmented image, the window of the padded input it equals (asserts there is one)."""
    out = aug.crop_flip(images, index, epoch)
    found = []
    for img, o in zip(images, out):
        matches = [k for k, win in _windows(img, aug.crop_padding).items() if torch.equal(win, o)]
        assert matches, "an augmented image is not a (mirrored) window of the padded input"
        found.append(matches[0])
    return found


def test_output_shape_dtype_and_normalisation():
    aug = _aug()
    x = _images(16)
    index = torch.arange(16)
    out = aug(x, index, epoch=0, train=True)
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    # Evaluation is exactly (x / 255 - mean) / std.
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(aug(x, index, 0, train=False), (x.float() / 255 - mean) / std)
    resized = _aug(image_size=64)(x, index, 0, train=True)
    assert resized.shape == (16, 3, 64, 64) and resized.dtype == torch.float32


def test_crops_stay_inside_the_padded_image_and_cover_all_offsets():
    aug = _aug()
    n = 600
    x = _images(n, seed=1)
    windows = _which_window(aug, x, torch.arange(n))
    offsets = {(dy, dx) for dy, dx, _ in windows}
    # 600 draws over 81 offsets: every offset shows up (the chance one is missed is < 1e-2).
    assert offsets == {(dy, dx) for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1)}


def test_flips_are_per_sample():
    aug = _aug(crop_padding=0)
    n = 64
    x = _images(n, seed=2)
    out = aug.crop_flip(x, torch.arange(n), epoch=0)
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert bool((flipped ^ kept).all())  # each image is either mirrored or untouched
    assert 16 < int(flipped.sum()) < 48  # both kinds in one batch, about half each


def test_no_crop_no_flip_is_identity():
    x = _images(8)
    assert torch.equal(_aug(crop_padding=0, flip=False).crop_flip(x, torch.arange(8), 0), x)


def test_cutout_zeroes_one_square_after_normalisation():
    """Each image loses exactly the 8x8 square around its drawn centre (clipped at the border), set to
    the mean (0 after normalisation), and nothing else."""
    from resnet_cifar.data.augment import random_ints

    n = 64
    aug = _aug(crop_padding=0, flip=False, cutout=8)
    x = torch.full((n, 3, 32, 32), 200, dtype=torch.uint8)  # no pixel normalises to 0
    index = torch.arange(n)
    out = aug(x, index, epoch=0, train=True)
    zero = (out == 0).all(1)  # (B, H, W): all three channels set to the mean
    assert torch.equal((out == 0).any(1), zero)  # never one channel alone
    cy, cx = random_ints(index, 0, 0, 3, 32), random_ints(index, 0, 0, 4, 32)  # the centres' streams
    for z, y, c in zip(zero, cy.tolist(), cx.tolist()):
        expected = torch.zeros(32, 32, dtype=torch.bool)
        expected[max(0, y - 4) : y + 4, max(0, c - 4) : c + 4] = True
        assert torch.equal(z, expected)
    full = int(zero.sum(dim=(1, 2)).eq(64).sum())
    # a centre in [4, 28] on both axes keeps the box inside: (25/32)^2 = 61% of the images expected
    assert n / 2 < full < n  # most boxes lie fully inside, and some are clipped at the border


def test_same_seed_same_images_independent_of_batch_composition():
    x = _images(40, seed=3)
    index = torch.arange(100, 140)
    a = _aug(seed=7, cutout=8)(x, index, epoch=3, train=True)
    b = _aug(seed=7, cutout=8)(x, index, epoch=3, train=True)
    assert torch.equal(a, b)
    # The same images in another order and in smaller batches get the same augmentation.
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    aug = _aug(seed=7, cutout=8)
    shuffled = torch.cat([aug(x[p], index[p], 3, train=True) for p in perm.split(7)])
    assert torch.equal(shuffled, a[perm])
    # Another seed or another epoch gives other crops/flips.
    assert not torch.equal(_aug(seed=8, cutout=8)(x, index, 3, train=True), a)
    assert not torch.equal(aug(x, index, 4, train=True), a)


def test_hand_written_crop_matches_a_plain_per_image_loop():
    """The fused gather equals slicing the padded image at the drawn offsets, one image at a time."""
    from resnet_cifar.data.augment import random_ints

    aug = _aug(seed=5)
    x = _images(32, seed=4)
    index = torch.arange(1000, 1032)
    out = aug.crop_flip(x, index, epoch=2)
    oy = random_ints(index, 5, 2, 0, 2 * PAD + 1)
    ox = random_ints(index, 5, 2, 1, 2 * PAD + 1)
    flip = random_ints(index, 5, 2, 2, 2).bool()
    for i in range(32):
        win = F.pad(x[i], (PAD,) * 4)[:, oy[i] : oy[i] + 32, ox[i] : ox[i] + 32]
        assert torch.equal(out[i], win.flip(-1) if flip[i] else win)


# --------------------------------------------------------------------------- DataModule
def _make(root, **kw) -> CIFAR10DataModule:
    args = dict(root=str(root), download=False, strict_sizes=False, val_size=100, batch_size=50, eval_batch_size=40)
    return CIFAR10DataModule(**{**args, **kw})


def _dm(root, **kw) -> CIFAR10DataModule:
    dm = _make(root, **kw)
    dm.setup("fit")
    return dm


class _Recorder(pl.LightningModule):
    """Records every batch each step sees (after on_after_batch_transfer)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3 * 32 * 32, 10)
        self.seen: dict[str, list] = {"train": [], "val": [], "test": []}

    def _step(self, split, batch):
        x, y, _ = batch
        self.seen[split].append((self.current_epoch, x.clone(), y.clone()))
        return F.cross_entropy(self.layer(x.flatten(1)), y)

    def training_step(self, batch, batch_idx):
        return self._step("train", batch)

    def validation_step(self, batch, batch_idx):
        self._step("val", batch)

    def test_step(self, batch, batch_idx):
        self._step("test", batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit_and_test(dm: CIFAR10DataModule, epochs: int = 2) -> _Recorder:
    rec = _Recorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        limit_train_batches=3,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(rec, datamodule=dm)
    trainer.test(rec, datamodule=dm, verbose=False)
    return rec


@pytest.mark.parametrize("on_device", [False, True])
def test_trainer_augments_training_batches_only(synthetic_root, on_device):
    dm = _make(synthetic_root, seed=11, on_device=on_device)
    rec = _fit_and_test(dm)
    aug = dm.augmenter
    train, val, test = dm.splits["train"], dm.splits["val"], dm.splits["test"]
    # Training batches: the sampler's permutation for that epoch, augmented with that epoch.
    for epoch in (0, 1):
        sampler = EpochShuffle(len(train), seed=11)
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        batches = [(x, y) for e, x, y in rec.seen["train"] if e == epoch]
        assert len(batches) == 3
        for b, (x, y) in enumerate(batches):
            idx = train.indices[order[b * 50 : (b + 1) * 50]]
            expected = aug(train.images[idx], idx, epoch, train=True)
            assert torch.equal(x, expected) and torch.equal(y, train.labels[idx])
            assert not torch.equal(x, aug.normalize(train.images[idx]))  # augmented indeed
    # Validation and test batches: normalised, never augmented, in order.
    for split, ds in (("val", val), ("test", test)):
        xs = torch.cat([x for _, x, _ in rec.seen[split]])
        n = len(ds) if split == "test" else 2 * len(ds)  # val runs after each of the 2 epochs
        assert len(xs) == n
        torch.testing.assert_close(xs[: len(ds)], aug.normalize(ds.images[ds.indices]), rtol=0, atol=0)


def test_on_device_on_a_cpu_trainer_gives_the_host_batches(synthetic_root):
    """data.on_device=true on a CPU trainer moves the split to the CPU, where it already is: the batches
    equal the host path's by construction, so this checks only that the option's own setup (the split
    moved to the trainer's device, the indices in ``__getitems__``) changes no value. The CUDA path it
    exists for (split on the GPU, pinned index copies) differs, and is compared with the host path on a
    GPU by bench/gpu_check.py (data.on_device true against false)."""
    a = _fit_and_test(_make(synthetic_root, seed=3, on_device=False), epochs=1)
    b = _fit_and_test(_make(synthetic_root, seed=3, on_device=True), epochs=1)
    for split in ("train", "val", "test"):
        assert len(a.seen[split]) == len(b.seen[split]) > 0
        for (_, xa, ya), (_, xb, yb) in zip(a.seen[split], b.seen[split]):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_transform_batch_outside_a_trainer(synthetic_root):
    dm = _dm(synthetic_root, seed=4)
    images, labels, index = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (50, 3, 32, 32)
    x, y = dm.transform_batch((images, labels, index), train=True, epoch=1)
    assert torch.equal(x, dm.augmenter(images, index, 1, train=True)) and torch.equal(y, labels)
    x_eval, _ = dm.transform_batch((images, labels, index), train=False)
    assert torch.equal(x_eval, dm.augmenter.normalize(images))
    # Without a trainer, on_after_batch_transfer never augments.
    x_hook, _, index_hook = dm.on_after_batch_transfer((images, labels, index), 0)
    assert torch.equal(index_hook, index)
    assert torch.equal(x_hook, x_eval)


@pytest.mark.parametrize("image_size", [32, 16, 64])
def test_tensor_and_torchvision_loaders_agree_on_evaluation_batches(synthetic_root, image_size):
    tensor_dm = _dm(synthetic_root, loader="tensor", image_size=image_size)
    tv_dm = _dm(synthetic_root, loader="torchvision", image_size=image_size)
    for split in ("val", "test"):
        t_batch = next(iter(getattr(tensor_dm, f"{split}_dataloader")()))
        x_t, y_t = tensor_dm.transform_batch(t_batch, train=False)
        x_v, y_v, _ = next(iter(getattr(tv_dm, f"{split}_dataloader")()))
        assert x_t.shape[-1] == image_size
        torch.testing.assert_close(x_t, x_v, atol=1e-5, rtol=1e-5)
        assert torch.equal(y_t, y_v)


def test_preprocess_is_one_resize_and_normalisation_for_uint8_and_float_inputs():
    """Shrinking is antialiased (as torchvision's Resize); uint8 and [0, 1] floats agree."""
    from torchvision.transforms.v2 import functional as TF

    from resnet_cifar.data.preprocess import Preprocess

    images = _images(4, seed=9)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    for size in (16, 32, 64):
        p = Preprocess(mean, std, size)
        x = p(images)
        assert x.shape == (4, 3, size, size)
        torch.testing.assert_close(x, p(images.float() / 255), atol=1e-5, rtol=0)
        torch.testing.assert_close(p(images[0]), x[0], atol=1e-6, rtol=0)  # one image, no batch dim
        ref = TF.normalize(TF.resize(images.float() / 255, [size, size], antialias=True), mean, std)
        torch.testing.assert_close(x, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_torchvision_training_batches_are_windows_of_the_padded_images(synthetic_root, mode):
    """Same augmentation family on both loaders: the per-sample pipeline also crops (of the image padded with
    black or mirrored, data.augment.padding_mode) and flips."""
    dm = _dm(synthetic_root, loader="torchvision", batch_size=20, augment={"padding_mode": mode})
    x, _, index = next(iter(dm.train_dataloader()))
    raw = dm.augmenter.normalize(dm.splits["train"].images[index])
    black = dm.augmenter.normalize(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))[:, :, :1, :1]
    for img, r in zip(x, raw):
        if mode == "reflect":
            padded = F.pad(r.unsqueeze(0), (PAD,) * 4, mode="reflect")
        else:
            padded = (F.pad(r - black[0], (PAD,) * 4) + black[0]).unsqueeze(0)  # pad with black, not 0
        wins = [padded[0, :, dy : dy + 32, dx : dx + 32] for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1)]
        assert any(torch.allclose(img, w, atol=1e-5) or torch.allclose(img, w.flip(-1), atol=1e-5) for w in wins)


def test_torchvision_loader_applies_jitter_autoaugment_and_erasing(synthetic_root):
    """The per-sample options reach the pipeline, and erasing (p=1) blanks a box in every image."""
    from torchvision.transforms import v2

    aug = {"crop_padding": 0, "flip": False, "color_jitter": 0.4, "autoaugment": True, "random_erasing": 1.0}
    dm = _dm(synthetic_root, loader="torchvision", batch_size=20, augment=aug)
    train, evaluate = dm._per_sample_transforms()
    kinds = [type(t) for t in train.transforms]
    assert v2.AutoAugment in kinds and v2.ColorJitter in kinds and v2.RandomErasing in kinds
    jitter = next(t for t in train.transforms if isinstance(t, v2.ColorJitter))
    assert jitter.brightness == jitter.contrast == jitter.saturation == (0.6, 1.4)
    policy = next(t for t in train.transforms if isinstance(t, v2.AutoAugment)).policy
    assert policy == v2.AutoAugmentPolicy.CIFAR10
    assert [type(t) for t in evaluate.transforms] == [type(dm.augmenter.preprocess)]  # no augmentation
    x, _, index = next(iter(dm.train_dataloader()))
    plain = dm.augmenter.normalize(dm.splits["train"].images[index])
    erased = (x == 0).flatten(1).float().mean(1)  # RandomErasing writes exact zeros
    assert (erased > 0.01).all() and not torch.allclose(x, plain)


def test_alternating_flip_mirrors_each_image_on_every_other_epoch():
    """airbench94's alternating flip: one draw per image, inverted on odd epochs; crops still drawn per epoch."""
    n = 64
    x = _images(n, seed=4)

    def mirrored(aug: BatchAugment, epoch: int) -> torch.Tensor:
        out = aug.crop_flip(x, torch.arange(n), epoch)
        return torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])

    alternating = _aug(crop_padding=0, alternating_flip=True)
    sides = [mirrored(alternating, epoch) for epoch in range(4)]
    assert torch.equal(sides[0], mirrored(_aug(crop_padding=0), 0))  # epoch 0: the usual draw
    assert torch.equal(sides[1], ~sides[0]) and torch.equal(sides[2], sides[0]) and torch.equal(sides[3], ~sides[0])
    independent = [mirrored(_aug(crop_padding=0), epoch) for epoch in range(2)]
    assert not torch.equal(independent[1], ~independent[0])  # random flips repeat a side for some images
    crops = [_which_window(_aug(alternating_flip=True), x, torch.arange(n), epoch) for epoch in (0, 2)]
    assert [w[:2] for w in crops[0]] != [w[:2] for w in crops[1]]


def test_reflect_padding_crops_windows_of_the_mirrored_image():
    """padding_mode=reflect: each image is a (mirrored) window of F.pad(mode="reflect"), every offset drawn."""
    aug = _aug(crop_padding=2, padding_mode="reflect", seed=3)
    x = _images(256, seed=2)
    index = torch.arange(256)
    out = aug.crop_flip(x, index, epoch=1)
    from resnet_cifar.data.augment import random_ints

    oy, ox = random_ints(index, 3, 1, 0, 5), random_ints(index, 3, 1, 1, 5)
    flip = random_ints(index, 3, 1, 2, 2).bool()
    padded = F.pad(x.float(), (2,) * 4, mode="reflect").to(torch.uint8)  # F.pad reflects float tensors only
    for i in range(256):
        win = padded[i, :, oy[i] : oy[i] + 32, ox[i] : ox[i] + 32]
        assert torch.equal(out[i], win.flip(-1) if flip[i] else win)
    assert len(set(zip(oy.tolist(), ox.tolist()))) == 25  # every shift of -2..2 in both directions
    zeros = _aug(crop_padding=2, seed=3).crop_flip(x, index, epoch=1)
    assert (zeros == 0).sum() > (out == 0).sum() + 1000  # black borders only with zero padding
