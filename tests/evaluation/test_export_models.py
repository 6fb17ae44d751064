"""export.py beyond ResNet-20: the cpu_30min model (ResNet-9 with the patch-whitening stem, GELU, conv tails,
pool-before-BN, frozen BN scales and an output scale), the resnet9_page model (CELU, EMA weights) and a
torchvision ResNet, each exported to every format and checked against the checkpoint's own PyTorch model,
inside and outside export's check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import compose_cfg, synthetic_overrides

from resnet_cifar.data.cifar10 import TEST_FILES, read_split
from resnet_cifar.data.preprocess import Preprocess
from resnet_cifar.run import train
from resnet_cifar.training.module import ImageClassifier

# A few training steps: the weights and batch-norm statistics move off their initialisation, so a
# format that drops an option (an activation, the order of pool and BN, the output scale) differs.
SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=6", "trainer.limit_val_batches=1"]  # OneCycle: > 5
SHORT += ["test=false", "report=none", "logger=none", "~callbacks.lr_monitor"]
MODELS = {
    # the model of experiment=cpu_30min as the preset builds it, over steps instead of its time budget
    "resnet9_cpu_30min": ["experiment=cpu_30min", "~trainer.max_time", "scheduler.progress=steps"],
    # Page's ResNet-9 (CELU, Page's widths halved for speed) with the EMA of its weights as the checkpoint's weights
    "resnet9_page_ema": ["experiment=resnet9_page", "model.widths=[32,64,128,256]", "callbacks.ema.warmup=true"],
    # torchvision's ResNet-18 (ImageNet stem at 32x32) from scratch
    "resnet18": ["model=resnet18", "scheduler=cosine", "scheduler.warmup_epochs=0"],
}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_format_reproduces_the_checkpoints_model(name, synthetic_root, tmp_path):
    import onnxruntime as ort

    from resnet_cifar.export import export, load_safetensors_model
    from resnet_cifar.models.factory import build_model

    run = tmp_path / "run"
    train(compose_cfg([*synthetic_overrides(synthetic_root), *MODELS[name], *SHORT], run))
    ckpt = run / "checkpoints" / "last.ckpt"
    module, data_hp = ImageClassifier.load_trained(ckpt)
    model_hp = dict(module.hparams.model)
    if name == "resnet9_page_ema":  # CELU, and the checkpoint's weights are the EMA, not the training weights
        saved = torch.load(ckpt, weights_only=True)
        assert model_hp["activation"] == "celu" and "current_model_state" in saved
        assert any(not torch.equal(v, saved["current_model_state"][k]) for k, v in saved["state_dict"].items())
    if name == "resnet9_cpu_30min":  # the preset's options reached the model
        preset = compose_cfg(["experiment=cpu_30min"], tmp_path / "preset").model
        keys = ("stem", "widths", "tails", "activation", "pool_before_bn", "bn_scale_trainable", "output_scale")
        assert {k: model_hp[k] for k in keys} == {k: preset[k] for k in keys}
        assert model_hp["stem"] == "whiten" and model_hp["widths"] == [24, 128, 384, 384]

    out = tmp_path / "export"
    cfg = compose_cfg([f"ckpt_path={ckpt}", f"data.root={synthetic_root}", "check_images=100"], out, "export")
    summary = export(cfg)
    assert set(summary["checks"]) == {"pytorch_wrapper", "onnx", "torch_export", "safetensors"}
    assert all(c["argmax_agreement"] == 1.0 for c in summary["checks"].values()), summary["checks"]

    # Independently of export's own check: the test images through the checkpoint's model.
    images = read_split(synthetic_root / "cifar-10-batches-py", TEST_FILES).images
    with torch.no_grad():
        ref = module.model(Preprocess.from_data_hparams(data_hp)(images))
    assert ref.std() > 0  # a trained network's logits, not a constant
    tol = {"atol": 1e-4, "rtol": 1e-4}
    x01 = images.float() / 255
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"images": x01.numpy()})[0], ref.numpy(), **tol)
    program = torch.export.load(str(out / "model.pt2")).module()
    with torch.no_grad():
        torch.testing.assert_close(program(x01), ref, **tol)
    # safetensors: rebuilt from its metadata alone, without Lightning and without the checkpoint
    model, meta = load_safetensors_model(out / "model.safetensors")
    assert {k: model_hp[k] for k in meta["model"]} == meta["model"]
    x = Preprocess.from_data_hparams(data_hp)(images)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, **tol)
        again = build_model(weights_path=str(out / "model.safetensors"), **meta["model"]).eval()
        torch.testing.assert_close(again(x), ref, **tol)
    assert json.loads((out / "export.json").read_text())["model"] == meta["model"]
