"""Compute options of the LightningModule: torch.compile, channels-last, flip test-time augmentation."""

from __future__ import annotations

import torch

from resnet_cifar.training.module import ImageClassifier


def _module(**kw) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(
        model={"name": "resnet20"}, optimizer={"name": "sgd", "lr": 0.1}, scheduler={"name": "none"}, **kw
    )


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_compile_keeps_state_dict_keys_and_outputs(monkeypatch):
    calls = []
    real_compile = torch.compile

    def eager_compile(model, **options):  # real Dynamo tracing, without the C++ build of inductor in a test
        calls.append(model)
        assert options == {"mode": "default", "dynamic": False}  # module.compile_mode / compile_dynamic
        return real_compile(model, backend="eager", **options)

    monkeypatch.setattr(torch, "compile", eager_compile)
    plain, compiled = _module(), _module(compile=True)
    assert calls == [compiled.model]
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert not any("_orig_mod" in k or "_run_model" in k for k in compiled.state_dict())
    # Checkpoints move between the two.
    compiled.load_state_dict(plain.state_dict())
    plain.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(_x()), plain(_x()))
    # The compiled wrapper shares the parameters: a training step on one changes the other.
    compiled.train()
    compiled(_x()).sum().backward()
    assert all(p.grad is not None for p in compiled.model.parameters())


def test_channels_last_gives_the_same_logits():
    plain, cl = _module(), _module(channels_last=True)
    cl.load_state_dict(plain.state_dict())
    conv = next(m for m in cl.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    plain.eval(), cl.eval()
    with torch.no_grad():
        torch.testing.assert_close(cl(_x()), plain(_x()), atol=1e-4, rtol=1e-4)


def test_tta_flip_averages_the_logits_of_image_and_mirror():
    module = _module(tta_flip=True).eval()
    x = _x(6)
    with torch.no_grad():
        plain = module.model(x)
        mirrored = module.model(x.flip(-1))
        tta = module.predict_logits(x)
    torch.testing.assert_close(tta, (plain + mirrored) / 2)
    assert not torch.allclose(tta, plain)  # the mirror changes the prediction of a random network
    off = _module(tta_flip=False).eval()
    off.load_state_dict(module.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(off.predict_logits(x), plain)
        # Test and predict steps use the averaged logits.
        probs = module.predict_step((x, torch.zeros(6, dtype=torch.long)), 0)
    torch.testing.assert_close(probs, tta.softmax(-1))


def test_training_loss_uses_label_smoothing():
    x, y = _x(), torch.tensor([0, 1, 2, 3])
    smooth, plain = _module(label_smoothing=0.2), _module()
    for m in (smooth, plain):
        m.train()
    loss = smooth.training_step((x, y, torch.arange(4)), 0)
    with torch.no_grad():
        logits = smooth(x)  # train mode: batch statistics, so the same logits as in the step
    expected = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.2)
    assert torch.allclose(loss.detach(), expected, atol=1e-6)
    unsmoothed = plain.training_step((x, y, torch.arange(4)), 0).detach()
    assert torch.allclose(unsmoothed, torch.nn.functional.cross_entropy(logits, y), atol=1e-6)
    assert not torch.allclose(loss.detach(), unsmoothed)  # same weights (seed 0): only the smoothing differs
