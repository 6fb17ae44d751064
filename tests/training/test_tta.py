"""Test-time augmentation: every view in one batched call, airbench94's weights for the shifted views."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resnet_cifar.training.module import ImageClassifier


def _module(**kw) -> ImageClassifier:
    torch.manual_seed(0)
    model = {"name": "resnet9", "widths": [8, 16, 32, 64]}
    return ImageClassifier(model=model, optimizer={"name": "sgd", "lr": 0.1}, scheduler={"name": "none"}, **kw).eval()


def _views(x: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    padded = F.pad(x, (shift,) * 4, mode="reflect")
    return padded[..., :32, :32], padded[..., 2 * shift :, 2 * shift :]  # up-left, down-right


@pytest.mark.parametrize("flip", [True, False])
def test_translate_tta_weights_the_shifted_views_as_airbench(flip):
    module = _module(tta_flip=flip, tta_translate=1)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    calls = []
    module.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    with torch.no_grad():
        tta = module.predict_logits(x)
        assert calls == [5 * (6 if flip else 3)]  # one call on every view
        one = module.model  # the views one at a time, without the module's hook

        def mirror(v):
            return (one(v) + one(v.flip(-1))) / 2 if flip else one(v)

        up_left, down_right = _views(x, 1)
        expected = 0.5 * mirror(x) + 0.25 * mirror(up_left) + 0.25 * mirror(down_right)
    torch.testing.assert_close(tta, expected, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(tta, mirror(x), atol=1e-4)  # the shifts change a random network's logits


def test_report_views_come_from_the_same_call():
    """_eval_step's plain and mirrored logits (the report's top-1 without TTA and with flip only) are the first
    two views of the batched call; the headline is the full TTA."""
    module = _module(tta_flip=False, tta_translate=2)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        headline, plain, mirrored = module.tta_logits(x, with_flip=True)
        torch.testing.assert_close(plain, module.model(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mirrored, module.model(x.flip(-1)), atol=1e-5, rtol=1e-4)
        up_left, down_right = _views(x, 2)
        expected = 0.5 * module.model(x) + 0.25 * (module.model(up_left) + module.model(down_right))
        torch.testing.assert_close(headline, expected, atol=1e-5, rtol=1e-4)
        off = _module()
        off.load_state_dict(module.state_dict())
        assert off.tta_logits(x)[2] is None
        torch.testing.assert_close(off.predict_logits(x), plain, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tta_val", [True, False])
def test_validation_without_tta_sees_one_view_and_the_test_keeps_them_all(tta_val):
    """module.tta_val=false (the default recipe): each validation batch goes through the network once, as
    the plain images, so val/acc is the plain network's; the test step still averages the six views."""
    module = _module(tta_flip=True, tta_translate=1, tta_val=tta_val)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 3])
    calls = []
    module.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    with torch.no_grad():
        module.validation_step((x, y, torch.arange(4)), 0)
        assert calls == [4 * 6 if tta_val else 4]
        plain, full = module.model(x), module.predict_logits(x)
        calls.clear()
        module.test_step((x, y, torch.arange(4)), 0)
        assert calls == [4 * 6]
    seen = plain if not tta_val else full
    expected = F.cross_entropy(seen, y)
    torch.testing.assert_close(module.val_loss.compute(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(module.test_loss.compute(), F.cross_entropy(full, y), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain, full, atol=1e-4)  # the two are told apart


@pytest.mark.parametrize(
    "model",
    [
        {"name": "resnet9", "widths": [8, 16, 32, 64]},
        {"name": "resnet20"},
        # the CPU presets' network: whitening stem, GELU, conv tails (conf/experiment/fast94.yaml)
        {"name": "resnet9", "widths": [24, 16, 32, 64], "stem": "whiten", "tails": ["conv", "conv", "conv"],
         "activation": "gelu", "pool_before_bn": True, "bn_scale_trainable": False},
    ],
)  # fmt: skip
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_chunked_evaluation_gives_the_one_calls_logits(model, precision):
    """module.eval_chunk splits the views' concatenation into calls of that many images on a CPU: in fp32 the
    logits are the one call's to the last bit (each image's logits depend on it alone in eval mode), under
    bf16 autocast equal up to bf16's rounding. The calls are those chunks: 6 views x 30 images in calls of 64."""
    torch.manual_seed(0)
    kw = dict(optimizer={"name": "sgd", "lr": 0.1}, scheduler={"name": "none"}, tta_flip=True, tta_translate=1)
    one = ImageClassifier(model=model, channels_last=True, eval_chunk=0, **kw).eval()
    chunked = ImageClassifier(model=model, channels_last=True, eval_chunk=64, **kw).eval()
    chunked.load_state_dict(one.state_dict())
    x = torch.randn(30, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    calls = []
    chunked.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=precision == "bf16"):
        expected, got = one.predict_logits(x), chunked.predict_logits(x)
    assert calls == [64, 64, 52]
    assert got.dtype == torch.float32
    if precision == "fp32":
        assert torch.equal(got, expected)
    else:  # bf16 outputs: at most a rounding step of bf16 apart (2^-8 relative), averaged over the views
        torch.testing.assert_close(got, expected, rtol=2**-7, atol=2**-7 * expected.abs().max().item())
