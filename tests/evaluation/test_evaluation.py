"""Evaluation report, validation prediction grid, predict.py and export.py on one small trained checkpoint."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import compose_cfg, run_script, synthetic_overrides
from PIL import Image
from torch import nn

from resnet_cifar.data.cifar10 import CLASSES, TEST_FILES, read_split
from resnet_cifar.data.datamodule import CIFAR10DataModule
from resnet_cifar.errors import UserError
from resnet_cifar.evaluation.calibration import TEMPERATURE_KEY, fit_temperature, nll
from resnet_cifar.evaluation.metrics import ReportMetrics
from resnet_cifar.evaluation.report import most_confused
from resnet_cifar.inference import Predictor, predict, to_model_input
from resnet_cifar.run import evaluate, train
from resnet_cifar.training.module import ImageClassifier

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as img:
        img.verify()
        assert img.format == "PNG" and min(img.size) > 50


@pytest.fixture(scope="module")
def run_dir(synthetic_root, tmp_path_factory) -> Path:
    """One short training run with the report and the prediction grid every epoch; without TTA, so that
    the tests below can check its report, predictions and exports against the plain network's logits."""
    out = tmp_path_factory.mktemp("report_run")
    overrides = [
        *synthetic_overrides(synthetic_root),
        "module.tta_flip=false",
        "module.tta_translate=0",
        "trainer.max_epochs=1",
        "callbacks.prediction_grid.every_n_epochs=1",
        "callbacks.prediction_grid.num_images=8",
        "report.max_misclassified=12",
    ]
    train(compose_cfg(overrides, out))
    return out


@pytest.fixture(scope="module")
def ckpt(run_dir) -> Path:
    return Path(json.loads((run_dir / "metrics.json").read_text())["best_ckpt"])


def normalised_test_images(root: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The test split read from disk and normalised by hand (not through the data module)."""
    test = read_split(root / "cifar-10-batches-py", TEST_FILES)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    return test.images, test.labels, (test.images.float() / 255 - mean) / std


def tensorboard_tags(run_dir: Path) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, list[str]] = {}
    for f in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        for kind, names in acc.Tags().items():
            if isinstance(names, list):
                tags.setdefault(kind, []).extend(names)
    return tags


# ------------------------------------------------------------------------------ report
def test_train_writes_report_files_metrics_and_tensorboard(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # the report's pass over the test set agrees with Lightning's test loop
    assert metrics["test/top1"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert metrics["test/nll"] == pytest.approx(metrics["test/loss"], rel=1e-4)
    assert metrics["test/top5"] >= metrics["test/top1"]
    report = metrics["report"]
    assert report["num_images"] == 100 and set(report["per_class"]) == set(CLASSES)
    folder = run_dir / "report"
    for name in ("confusion_matrix", "reliability", "misclassified"):
        assert_png(folder / f"{name}.png")
    md = (folder / "report.md").read_text()
    for target in ("confusion_matrix.png", "reliability.png", "misclassified.png"):
        assert f"]({target})" in md
    rows = list(csv.reader((folder / "confusion_matrix.csv").read_text().splitlines()))
    assert rows[0][1:] == list(CLASSES)
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == report["confusion_matrix"]
    tags = tensorboard_tags(run_dir)
    assert "val/predictions" in tags["images"]  # the callback
    assert {"report/confusion_matrix", "report/reliability"} <= set(tags["images"])
    assert "report/top1" in tags["scalars"]


def test_report_numbers_agree_with_an_independent_computation(run_dir, ckpt, synthetic_root):
    report = json.loads((run_dir / "metrics.json").read_text())["report"]
    module = ImageClassifier.load_trained(ckpt)[0]
    _, labels, x = normalised_test_images(synthetic_root)
    with torch.no_grad():
        probs = module.model(x).softmax(-1).numpy()
    y = labels.numpy()
    pred = probs.argmax(1)
    cm = np.zeros((10, 10), dtype=int)
    np.add.at(cm, (y, pred), 1)
    assert report["confusion_matrix"] == cm.tolist()
    assert report["top1"] == pytest.approx(np.trace(cm) / cm.sum(), abs=1e-6)
    assert report["top1"] == pytest.approx((pred == y).mean(), abs=1e-6)
    top5 = np.argsort(-probs, axis=1)[:, :5]
    assert report["top5"] == pytest.approx((top5 == y[:, None]).any(1).mean(), abs=1e-6)
    recall = np.diag(cm) / cm.sum(1)
    col = cm.sum(0)
    precision = np.where(col > 0, np.diag(cm) / np.maximum(col, 1), 0.0)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    for i, name in enumerate(CLASSES):
        pc = report["per_class"][name]
        assert pc["recall"] == pytest.approx(recall[i], abs=1e-6)
        assert pc["precision"] == pytest.approx(precision[i], abs=1e-6)
        assert pc["f1"] == pytest.approx(f1[i], abs=1e-6)
        assert pc["support"] == cm[i].sum()
    # ECE: 15 equal-width bins (lo, hi], |accuracy - confidence| weighted by the bin's share
    conf = probs.max(1)
    bins = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
    ece = sum(
        (bins == b).mean() * abs((pred == y)[bins == b].mean() - conf[bins == b].mean())
        for b in range(15)
        if (bins == b).any()
    )
    assert report["ece"] == pytest.approx(ece, abs=1e-5)
    off = cm - np.diag(np.diag(cm))
    if off.max() > 0:
        t, p = np.unravel_index(off.argmax(), off.shape)
        top = report["most_confused"][0]
        assert top["count"] == off.max()
        assert off[CLASSES.index(top["true"]), CLASSES.index(top["predicted"])] == off.max()


def test_report_metrics_on_hand_made_probabilities_in_two_batches():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    labels = torch.tensor([0, 1, 1, 2, 2])  # right, right, 1->0, right, 2->0
    metrics = ReportMetrics(["a", "b", "c"], n_bins=10, max_misclassified=1, tta=False)
    for part in (slice(0, 2), slice(2, 5)):  # softmax(log p) = p
        metrics.update(probs[part].log(), labels[part], torch.arange(5)[part])
    r = metrics.compute()
    assert r["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [1, 0, 1]] and r["num_images"] == 5
    assert r["top1"] == pytest.approx(3 / 5)
    assert r["top5"] == 1.0  # fewer than 5 classes: every label is in the top 3
    assert r["per_class"]["a"]["precision"] == pytest.approx(1 / 3)
    assert r["per_class"]["b"]["recall"] == pytest.approx(1 / 2)
    assert r["nll"] == pytest.approx(float(-probs[torch.arange(5), labels].log().mean()), abs=1e-6)
    # bins: 0.7 right, 0.8 right, 0.6 wrong, 0.6 right, 0.5 wrong
    expected = (1 / 5) * abs(1 - 0.7) + (1 / 5) * abs(1 - 0.8) + (2 / 5) * abs(0.5 - 0.6) + (1 / 5) * abs(0 - 0.5)
    assert r["ece"] == pytest.approx(expected, abs=1e-6)
    bins = r["reliability"]
    assert bins["count"][5:8] == [2, 1, 1] and sum(bins["count"]) == 5  # 0.5 is in (0.4, 0.5]
    ece_from_bins = sum(n / 5 * abs(a - c) for n, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"]))
    assert ece_from_bins == pytest.approx(r["ece"], abs=1e-6)  # the diagram and the ECE bin alike
    assert r["mistakes"] == {"confidence": [pytest.approx(0.6)], "index": [2], "predicted": [0], "target": [1]}
    assert most_confused(r["confusion_matrix"], ["a", "b", "c"], 5) == [
        {"true": "b", "predicted": "a", "count": 1, "fraction_of_true": 0.5},
        {"true": "c", "predicted": "a", "count": 1, "fraction_of_true": 0.5},
    ]


def test_report_top1_is_test_acc_on_bf16_logits_whose_average_rounds_to_a_tie():
    """Under autocast the model returns bf16 logits. Averaged with the mirror's in bf16, image 0's
    class-1 logit (1.0078125 + 1.0) rounds to 2.0, a tie that argmax gives to class 0; in fp32 it is
    1.00390625 and class 1 wins. test/acc and the report must decide alike: from the same fp32 logits."""
    module = ImageClassifier(
        model={"name": "resnet20"}, optimizer={"name": "sgd", "lr": 0.1}, scheduler={"name": "none"}, tta_flip=True
    ).eval()
    module.enable_report({"n_bins": 5, "max_misclassified": 2, "tta": True})
    rest = torch.full((2, 8), -10.0)  # the other eight classes, far below
    plain = torch.cat([torch.tensor([[1.0, 1.0078125], [0.0, 2.0]]), rest], 1).bfloat16()
    mirrored = torch.cat([torch.tensor([[1.0, 1.0], [0.0, 2.0]]), rest], 1).bfloat16()
    x = torch.zeros(2, 3, 32, 32)
    x[..., 0] = 1.0  # the mirror image differs: its last column is the lit one

    def run_model(inp: torch.Tensor) -> torch.Tensor:  # per pair of images: one call or the views batched
        return torch.cat([plain if bool(pair[0, 0, 0, 0]) else mirrored for pair in inp.split(2)])

    object.__setattr__(module, "_run_model", run_model)
    labels = torch.tensor([1, 1])
    with torch.no_grad():
        module._eval_step((x, labels, torch.arange(2)), module.test_acc, module.test_loss, report=True)
    report = module.report_metrics.compute()
    assert float(module.test_acc.compute()) == report["top1"] == report["tta"]["top1_flip_tta"] == 1.0
    assert module.predict_logits(x).argmax(-1).tolist() == [1, 1]  # predict decides as the test loop


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_report_top1_equals_the_logged_test_acc_under_every_precision(synthetic_root, tmp_path, precision):
    overrides = [*synthetic_overrides(synthetic_root, precision), "trainer.max_epochs=1", "module.tta_flip=true"]
    overrides.append("module.tta_translate=0")  # flip only: the headline is then the report's flip TTA
    metrics = train(compose_cfg([*overrides, "logger=none"], tmp_path))
    assert metrics["precision"] == precision
    assert metrics["test/top1"] == metrics["test/acc"]  # exactly: one computation from the same logits
    assert metrics["test/top1_flip_tta"] == metrics["test/acc"]


def test_eval_script_writes_report_with_flip_tta(run_dir, ckpt, synthetic_root, tmp_path):
    out = tmp_path / "eval_run"
    res = run_script(
        "eval.py",
        f"ckpt_path={ckpt}",
        f"data.root={synthetic_root}",
        "tta_flip=true",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["report"]["tta_flip"] is True
    assert metrics["test/top1"] == pytest.approx(metrics["test/top1_flip_tta"])
    assert metrics["test/top1"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert_png(out / "report" / "confusion_matrix.png")
    assert "report/confusion_matrix" in tensorboard_tags(out)["images"]


# ----------------------------------------------------------------------- calibration
def split_logits(module: ImageClassifier, data_hp: dict, root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits on a split, through a DataModule of its own (outside any Trainer)."""
    dm = CIFAR10DataModule(**{**data_hp, "root": str(root), "download": False})
    dm.setup("test")
    ds = dm.splits[split]
    images, labels = ds.images[ds.indices], ds.labels[ds.indices]
    x, _ = dm.transform_batch((images, labels, ds.indices), train=False)
    with torch.no_grad():
        return module.predict_logits(x), labels


def test_train_fits_the_temperature_on_the_validation_split_and_stores_it(run_dir, ckpt, synthetic_root):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    report = metrics["report"]
    t = report["temperature"]
    assert report["calibration"]["source"] == "fitted on the validation split (100 images)"
    assert torch.load(ckpt, weights_only=True)[TEMPERATURE_KEY] == t  # in the checkpoint that was tested
    module, data_hp = ImageClassifier.load_trained(ckpt)
    assert module.temperature == t
    # the fit, repeated by hand on the validation logits, lands on the same temperature: the minimum of the NLL
    val_logits, val_labels = split_logits(module, data_hp, synthetic_root, "val")
    assert fit_temperature(val_logits, val_labels) == pytest.approx(t, rel=1e-4)
    assert report["calibration"]["val_nll_calibrated"] == pytest.approx(nll(val_logits, val_labels, t), rel=1e-5)
    assert nll(val_logits, val_labels, t) < min(nll(val_logits, val_labels, s) for s in (t * 1.1, t / 1.1, 1.0))
    # the calibrated test numbers are those of softmax(test logits / T); accuracy comes from the logits alone
    logits, labels = split_logits(module, data_hp, synthetic_root, "test")
    assert metrics["test/nll_calibrated"] == pytest.approx(nll(logits, labels, t), rel=1e-5)
    assert metrics["test/nll"] == pytest.approx(nll(logits, labels), rel=1e-5)
    assert metrics["test/ece_calibrated"] != pytest.approx(metrics["test/ece"], abs=1e-3)
    assert sum(report["reliability_calibrated"]["count"]) == 100
    md = (run_dir / "report" / "report.md").read_text()
    assert f"After temperature scaling (T = {t:.4f}" in md and f"{metrics['test/ece_calibrated']:.4f}" in md


def test_eval_repeats_the_calibrated_numbers_and_calibration_changes_no_prediction(
    run_dir, ckpt, synthetic_root, tmp_path
):
    trained = json.loads((run_dir / "metrics.json").read_text())
    base = [f"ckpt_path={ckpt}", f"data.root={synthetic_root}", "report.loggers=false"]
    on = evaluate(compose_cfg(base, tmp_path / "on", "eval"))
    assert on["report"]["calibration"]["source"] == "stored in the checkpoint"  # not fitted again
    for key in ("test/ece_calibrated", "test/nll_calibrated", "test/acc", "test/top5"):
        assert on[key] == pytest.approx(trained[key], abs=1e-6), key
    off = evaluate(compose_cfg([*base, "report.calibrate=false"], tmp_path / "off", "eval"))
    assert "test/ece_calibrated" not in off and off["report"]["temperature"] is None
    # accuracy, top-5, every decision: the same with and without the temperature
    assert (off["test/acc"], off["test/top1"], off["test/top5"]) == (on["test/acc"], on["test/top1"], on["test/top5"])
    assert off["report"]["confusion_matrix"] == on["report"]["confusion_matrix"]
    assert off["test/ece"] == on["test/ece"] and off["test/nll"] == on["test/nll"]  # the raw softmax's numbers
    assert "Not calibrated: report.calibrate=false" in (tmp_path / "off" / "report" / "report.md").read_text()


def test_a_run_without_a_validation_split_says_why_it_is_not_calibrated(synthetic_root, tmp_path, caplog):
    overrides = [*synthetic_overrides(synthetic_root), "trainer.max_epochs=1", "data.val_size=0"]
    overrides += ["~callbacks.model_checkpoint", "logger=none", "scheduler=cosine", "scheduler.warmup_epochs=0"]
    with caplog.at_level("INFO", logger="resnet_cifar"):
        metrics = train(compose_cfg(overrides, tmp_path))
    reason = "no validation split to fit the temperature on (data.val_size=0)"
    assert metrics["report"]["calibration"] == {"skipped": reason} and metrics["report"]["temperature"] is None
    assert "test/ece_calibrated" not in metrics and "test/ece" in metrics
    assert f"temperature scaling skipped: {reason}" in caplog.text
    assert f"not calibrated: {reason}" in caplog.text  # the closing summary
    assert not any(TEMPERATURE_KEY in torch.load(p, weights_only=True) for p in tmp_path.rglob("*.ckpt"))


# --------------------------------------------------------------------------- predict
def test_predict_on_png_files_equals_prediction_on_the_tensor(ckpt, synthetic_root, tmp_path):
    images, labels, x = normalised_test_images(synthetic_root)
    folder = tmp_path / "inputs"
    (folder / "sub").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(folder / ("sub" if i % 2 else "") / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "truncated.png").write_bytes(PNG_MAGIC + b"garbage")
    out = tmp_path / "pred.json"
    cfg = compose_cfg([f"ckpt_path={ckpt}", f"inputs={folder}", "top_k=3", f"output={out}"], tmp_path, "predict")
    result = predict(cfg)
    assert sorted(Path(f).name for f, _ in result.skipped) == ["notes.txt", "truncated.png"]
    assert len(result.predictions) == 6
    module = ImageClassifier.load_trained(ckpt)[0]
    temperature = torch.load(ckpt, weights_only=True)[TEMPERATURE_KEY]  # fitted after training, stored there
    assert module.temperature == temperature and abs(temperature - 1) > 0.05
    with torch.no_grad():
        logits = module.model(x[:6])
    probs = (logits / temperature).softmax(-1)  # the calibrated probabilities ...
    by_name = {Path(p.file).name: p for p in result.predictions}
    for i in range(6):
        p = by_name[f"img{i}.png"]
        top_p, top_i = probs[i].topk(3)
        assert top_i.tolist() == logits[i].topk(3).indices.tolist()  # ... of the same classes, in the same order
        assert p.classes == [CLASSES[j] for j in top_i.tolist()]
        assert p.probabilities == pytest.approx(top_p.tolist(), abs=1e-5)
        assert p.probabilities != pytest.approx(logits[i].softmax(-1).topk(3).values.tolist(), abs=1e-3)
    doc = json.loads(out.read_text())
    assert len(doc["predictions"]) == 6 and len(doc["skipped"]) == 2


def test_predict_resizes_any_size_and_writes_csv(ckpt, tmp_path):
    assert to_model_input(torch.zeros(3, 100, 60, dtype=torch.uint8)).shape == (3, 32, 32)
    img = torch.arange(32).repeat(3, 32, 1).to(torch.uint8)  # 3x32x32: left as is
    assert torch.equal(to_model_input(img), img)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    out = tmp_path / "p.csv"
    cfg = compose_cfg(
        [f"ckpt_path={ckpt}", f"inputs={tmp_path / 'a.jpg'}", "top_k=20", f"output={out}"], tmp_path, "predict"
    )
    predict(cfg)
    rows = list(csv.reader(out.read_text().splitlines()))
    assert rows[0] == ["file"] + [h for r in range(1, 11) for h in (f"class_{r}", f"prob_{r}")]  # top_k capped at 10
    assert sum(float(v) for v in rows[1][2::2]) == pytest.approx(1.0, abs=1e-4)
    assert Predictor.from_checkpoint(ckpt).class_names == list(CLASSES)


def test_predict_errors_are_one_line(ckpt, tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = compose_cfg([f"ckpt_path={ckpt}", f"inputs={tmp_path / 'empty'}"], tmp_path, "predict")
    with pytest.raises(UserError, match="empty folder"):
        predict(cfg)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_text("text")
    cfg = compose_cfg([f"ckpt_path={ckpt}", f"inputs={tmp_path / 'junk'}"], tmp_path, "predict")
    with pytest.raises(UserError, match="none of the 1 files"):
        predict(cfg)
    res = run_script("predict.py", f"ckpt_path={ckpt}", f"inputs={tmp_path / 'missing'}", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: inputs=") and "Traceback" not in res.stderr


# ---------------------------------------------------------------------------- export
@pytest.mark.parametrize(
    ("device", "cuda_gpus", "expected"),
    [("gpu", 1, "cuda"), ("GPU:1", 2, "cuda:1"), ("cuda", 1, "cuda"), ("auto", 1, "cuda"), ("auto", 0, "cpu")],
)
def test_predict_takes_lightnings_device_spelling(monkeypatch, device, cuda_gpus, expected):
    from resnet_cifar.inference import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_gpus)
    assert resolve_device(device) == torch.device(expected)
    if cuda_gpus:
        with pytest.raises(UserError, match=f"device=gpu:{cuda_gpus} but only {cuda_gpus} CUDA GPU"):
            resolve_device(f"gpu:{cuda_gpus}")


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", "device=gpu but no CUDA GPU is visible: use device=cpu or device=auto"),
        ("cuda:3", "device=cuda:3 but no CUDA GPU is visible"),
        ("tpu", "device=tpu: expected cpu, cuda, cuda:N, gpu or auto"),
    ],
)
def test_predict_device_errors_are_one_line(ckpt, tmp_path, monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    cfg = compose_cfg([f"ckpt_path={ckpt}", f"inputs={tmp_path}", f"device={device}"], tmp_path, "predict")
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        predict(cfg)


def test_export_matches_pytorch(ckpt, synthetic_root, tmp_path):
    import onnxruntime as ort

    from resnet_cifar.export import export, load_safetensors_model
    from resnet_cifar.models.factory import build_model

    cfg = compose_cfg([f"ckpt_path={ckpt}", f"data.root={synthetic_root}", "check_images=100"], tmp_path, "export")
    summary = export(cfg)
    assert set(summary["checks"]) == {"pytorch_wrapper", "onnx", "torch_export", "safetensors"}
    assert all(c["max_abs_diff"] <= 1e-3 and c["argmax_agreement"] == 1.0 for c in summary["checks"].values())
    written = json.loads((tmp_path / "export.json").read_text())
    assert written["class_names"] == list(CLASSES)
    # the sidecar carries the checkpoint's temperature: probabilities = softmax(logits / temperature)
    assert written["temperature"] == torch.load(ckpt, weights_only=True)[TEMPERATURE_KEY]

    # independently of export's own check: [0, 1] images in, the module's logits out
    images, _, x = normalised_test_images(synthetic_root)
    module = ImageClassifier.load_trained(ckpt)[0]
    with torch.no_grad():
        ref = module.model(x)
    x01 = images.float() / 255
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 7, 100):  # dynamic batch size
        onnx_out = session.run(None, {"images": x01[:n].numpy()})[0]
        np.testing.assert_allclose(onnx_out, ref[:n].numpy(), atol=1e-4, rtol=1e-4)
    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    with torch.no_grad():
        torch.testing.assert_close(program(x01[:3]), ref[:3], atol=1e-4, rtol=1e-4)
    # safetensors: plain PyTorch, no Lightning; also through model.weights_path
    model, meta = load_safetensors_model(tmp_path / "model.safetensors")
    assert meta["model"]["name"] == "resnet20" and meta["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    assert meta["temperature"] == written["temperature"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)
        again = build_model(**{**meta["model"], "weights_path": str(tmp_path / "model.safetensors")}).eval()
        torch.testing.assert_close(again(x), ref)


def test_export_check_tolerance_is_per_logit_absolute_plus_relative():
    """The wrapper check accepts rounding that scales with large logits, and rejects a real difference."""
    from resnet_cifar.export import ExportCheckError, check_exports

    class Scaled(nn.Module):
        def __init__(self, scale: float, shift: float) -> None:
            super().__init__()
            self.scale, self.shift = scale, shift

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 200.0 * x.flatten(1)[:, :10] * self.scale + self.shift

    class Wrapper(Scaled):
        def __init__(self, scale: float, shift: float) -> None:
            super().__init__(scale, shift)
            self.preprocess = lambda images: images.float() / 255.0

    module = SimpleNamespace(model=Scaled(1.0, 0.0))
    images = torch.full((4, 3, 32, 32), 255, dtype=torch.uint8)  # logits of 200
    near = Wrapper(1.0 + 5e-5, 0.0)  # off by 0.01 on a logit of 200: float rounding amplified, not an error
    checks = check_exports(module, near, {}, images, atol=1e-3, rtol=1e-3)
    assert checks["pytorch_wrapper"]["max_abs_diff"] == pytest.approx(0.01, rel=1e-3)
    with pytest.raises(ExportCheckError, match=r"differs from PyTorch by 0.0099.*rtol=0.0 "):
        check_exports(module, near, {}, images, atol=1e-3, rtol=0.0)
    with pytest.raises(ExportCheckError, match="pytorch_wrapper export differs from PyTorch by 0.5"):
        check_exports(module, Wrapper(1.0, 0.5), {}, images, atol=1e-3, rtol=1e-3)
