"""Compute options of the LightningModule: torch.compile, channels-last, flip test-time augmentation."""

from __future__ import annotations

import pytest
import torch
from helpers import compose_cfg

from resnet_cifar.config import check_compiler
from resnet_cifar.errors import ConfigError
from resnet_cifar.training.module import ImageClassifier


def _module(model: dict | None = None, **kw) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(
        model=model or {"name": "resnet20"}, optimizer={"name": "sgd", "lr": 0.1}, scheduler={"name": "none"}, **kw
    )


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_compile_keeps_state_dict_keys_and_outputs(monkeypatch):
    """torch.compile with its default backend (inductor: generated C++ kernels on the CPU), as a run gets it."""
    calls = []
    real_compile = torch.compile

    def recording_compile(model, **options):
        calls.append((model, options))
        return real_compile(model, **options)

    monkeypatch.setattr(torch, "compile", recording_compile)
    # A tiny ResNet-9: inductor's compilation (~10-20 s on 2 cores) grows with the graph, not the widths.
    tiny = {"name": "resnet9", "widths": [4, 8, 8, 8]}
    plain, compiled = _module(model=tiny), _module(model=tiny, compile=True)
    assert calls == [(compiled.model, {"mode": "default", "dynamic": False})]  # module.compile_mode / _dynamic
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert not any("_orig_mod" in k or "_run_model" in k for k in compiled.state_dict())
    # Checkpoints move between the two: the same weights give the same outputs (train mode, batch
    # statistics: one graph compiled, forward and backward).
    compiled.load_state_dict(plain.state_dict())
    plain.train(), compiled.train()
    out = compiled(_x())
    with torch.no_grad():
        torch.testing.assert_close(out, plain(_x()), atol=1e-4, rtol=1e-4)
    # The compiled wrapper shares the parameters of the plain module under it (compiled.model, what the
    # checkpoints save): an optimizer step through the wrapper moves them, and the wrapper then computes
    # with the moved values (no stale copy baked into the graph).
    before = {k: v.detach().clone() for k, v in compiled.model.named_parameters()}
    optimizer = torch.optim.SGD(compiled.parameters(), lr=0.1)
    out.square().mean().backward()
    optimizer.step()
    moved = [k for k, v in compiled.model.named_parameters() if not torch.equal(v, before[k])]
    assert before and len(moved) == len(before), set(before) - set(moved)
    with torch.no_grad():
        torch.testing.assert_close(compiled(_x()), compiled.model(_x()), atol=1e-4, rtol=1e-4)


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


def test_compile_on_a_cpu_without_a_compiler_is_a_config_error(monkeypatch, tmp_path):
    """module.compile (the default) asks torch's own compiler search before anything loads; without compile, or
    on a GPU (Triton kernels, see the next test), no C++ compiler is needed."""
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler() -> str:
        raise RuntimeError("InvalidCxxCompiler")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    cfg = compose_cfg(["trainer.accelerator=cpu"], tmp_path)
    assert cfg.module.compile is True  # the default recipe compiles
    message = r"^module.compile=true on a CPU needs a C\+\+ compiler .*module.compile=false$"
    with pytest.raises(ConfigError, match=message):
        check_compiler(cfg)
    check_compiler(compose_cfg(["trainer.accelerator=cpu", "module.compile=false"], tmp_path))
    monkeypatch.setenv("CC", "/bin/sh")  # any executable: a GPU run asks for a C compiler only
    check_compiler(compose_cfg(["trainer.accelerator=gpu"], tmp_path))
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "g++")
    check_compiler(cfg)


@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "auto"])
def test_compile_on_cuda_without_a_c_compiler_is_a_config_error(monkeypatch, tmp_path, accelerator):
    """On CUDA Triton builds its kernel launcher with a C compiler ($CC, gcc or clang): no compiler on the PATH
    is the same one-line error at start-up as on the CPU, not a traceback at the first step."""
    import torch._inductor.cpp_builder as cpp_builder

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "g++")  # the CPU's check would pass
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    cfg = compose_cfg([f"trainer.accelerator={accelerator}"], tmp_path)
    message = r"^module.compile=true on CUDA needs a C compiler .*module.compile=false$"
    with pytest.raises(ConfigError, match=message):
        check_compiler(cfg)
    check_compiler(compose_cfg([f"trainer.accelerator={accelerator}", "module.compile=false"], tmp_path))
    monkeypatch.setenv("CC", "/bin/sh")  # $CC, as Triton honours it
    check_compiler(cfg)
    monkeypatch.setenv("CC", str(tmp_path / "no_such_cc"))
    with pytest.raises(ConfigError, match=message):
        check_compiler(cfg)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "clang").write_text("")
    (tmp_path / "empty" / "clang").chmod(0o755)
    monkeypatch.delenv("CC")
    check_compiler(cfg)  # clang when gcc is missing
