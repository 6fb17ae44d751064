"""Temperature scaling: the fit, the scaled probabilities, the report's calibrated numbers and figure.

The end-to-end path (fitted after training on the validation split, stored in the checkpoint, used by
eval.py, predict.py and export.py) is tested on the trained run of ``test_evaluation.py``.
"""

from __future__ import annotations

import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from resnet_cifar.evaluation.calibration import TEMPERATURE_KEY, fit_temperature, nll, scaled_softmax
from resnet_cifar.evaluation.figures import reliability_figure
from resnet_cifar.evaluation.metrics import ReportMetrics


def sampled(temperature: float, n: int = 20_000, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits, and labels drawn from ``softmax(logits / temperature)``: the true temperature is known."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * 4
    labels = torch.multinomial((logits / temperature).softmax(-1), 1, generator=g).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_recovers_the_temperature_the_labels_were_drawn_with(true_t):
    logits, labels = sampled(true_t)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_t, rel=0.05)
    # the minimum of the NLL: a step either way is worse, and T = 1 (the raw softmax) too
    best = nll(logits, labels, fitted)
    assert best < nll(logits, labels, fitted * 1.1) and best < nll(logits, labels, fitted / 1.1)
    assert best < nll(logits, labels, 1.0)


def test_fit_inside_inference_mode_as_in_a_test_loop():
    logits, labels = sampled(2.0, n=2000)
    with torch.inference_mode():
        logits, labels = logits.clone(), labels.clone()  # inference tensors
        assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.15)


def test_scaled_probabilities_keep_every_prediction():
    logits = torch.randn(500, 10, generator=torch.Generator().manual_seed(1)) * 3
    for t in (0.3, 1.0, 4.0):
        probs = scaled_softmax(logits, t)
        torch.testing.assert_close(probs, (logits / t).softmax(-1))
        assert torch.equal(probs.topk(5).indices, logits.topk(5).indices)  # top-1 ... top-5 in the same order
    torch.testing.assert_close(scaled_softmax(logits, None), logits.softmax(-1))  # not calibrated: plain softmax
    assert scaled_softmax(logits.bfloat16(), 2.0).dtype == torch.float32


def test_report_metrics_add_the_calibrated_numbers_and_change_no_decision():
    logits, labels = sampled(2.5, n=600, seed=3)
    index = torch.arange(600)
    plain, scaled = (ReportMetrics([str(c) for c in range(10)], n_bins=15, max_misclassified=5) for _ in range(2))
    scaled.temperature, scaled.calibration = 2.5, {"temperature": 2.5, "source": "test"}
    for part in (slice(0, 250), slice(250, 600)):
        for m in (plain, scaled):
            m.update(logits[part], labels[part], index[part])
    a, b = plain.compute(), scaled.compute()
    for key in ("top1", "top5", "confusion_matrix", "per_class", "ece", "nll", "reliability"):
        assert a[key] == b[key], key  # decisions and the raw probabilities' numbers are the same
    assert a["temperature"] is None and "ece_calibrated" not in a
    assert b["temperature"] == 2.5 and b["calibration"]["source"] == "test"
    probs = (logits / 2.5).softmax(-1)
    expected_ece = MulticlassCalibrationError(10, n_bins=15, norm="l1")(probs, labels)
    assert b["ece_calibrated"] == pytest.approx(float(expected_ece), abs=1e-6)
    assert b["nll_calibrated"] == pytest.approx(nll(logits, labels, 2.5), abs=1e-5)
    assert b["ece_calibrated"] < b["ece"] and b["nll_calibrated"] < b["nll"]  # the true temperature helps
    assert sum(b["reliability_calibrated"]["count"]) == 600
    # the most confident mistakes are ranked and shown with the probabilities a user gets (calibrated)
    wrong = probs.argmax(-1) != labels
    conf = probs.max(-1).values[wrong]
    assert b["mistakes"]["confidence"] == pytest.approx(conf.sort(descending=True).values[:5].tolist(), abs=1e-6)


def test_the_reliability_figure_draws_both_curves():
    logits, labels = sampled(2.5, n=300)
    m = ReportMetrics([str(c) for c in range(10)], n_bins=10)
    m.temperature = 2.5
    m.update(logits, labels, torch.arange(300))
    r = m.compute()
    fig = reliability_figure(r["reliability"], r["ece"], r["reliability_calibrated"], r["ece_calibrated"], 2.5)
    ax = fig.axes[0]
    curves = {line.get_label(): line for line in ax.get_lines()}
    calibrated = curves["after temperature scaling (T = 2.5)"]
    bins = r["reliability_calibrated"]
    filled = [n > 0 for n in bins["count"]]
    x, y = calibrated.get_xdata(), calibrated.get_ydata()
    assert list(x) == pytest.approx([c for c, f in zip(bins["confidence"], filled) if f])
    assert list(y) == pytest.approx([a for a, f in zip(bins["accuracy"], filled) if f])
    assert f"{r['ece_calibrated']:.4f}" in ax.get_title() and f"{r['ece']:.4f}" in ax.get_title()
    raw_only = reliability_figure(r["reliability"], r["ece"]).axes[0]
    assert "after temperature scaling" not in " ".join(line.get_label() for line in raw_only.get_lines())


def test_the_temperature_from_the_last_validations_logits_equals_a_refit(synthetic_root, tmp_path):
    """module.tta_val=last: the validation that ends the fit sees the test's views, and its logits are the ones
    the temperature is fitted on (no second pass over the validation split). On the same checkpoint, a refit
    from a pass of its own (eval.py on a copy without the stored temperature) gives the same temperature to
    the last bit, and the same test and report numbers."""
    from helpers import compose_cfg, synthetic_overrides

    from resnet_cifar.models.weights import safe_load
    from resnet_cifar.run import evaluate, train
    from resnet_cifar.training.checkpointing import atomic_torch_save

    run = tmp_path / "run"
    overrides = [
        *synthetic_overrides(synthetic_root),
        "model=resnet9",
        "model.widths=[8,16,32,64]",
        "module.tta_val=last",
        "module.eval_chunk=64",
        "callbacks.model_checkpoint.monitor=null",  # the last epoch's weights are the tested ones
        "logger=none",
    ]
    metrics = train(compose_cfg(overrides, run))
    assert metrics["report"]["calibration"]["logits"] == "the fit's last validation"
    ckpt = safe_load(metrics["best_ckpt"], "ckpt_path")
    stored = ckpt.pop(TEMPERATURE_KEY)
    assert stored == metrics["report"]["temperature"]
    bare = tmp_path / "bare.ckpt"
    atomic_torch_save(ckpt, bare)  # the same weights, no temperature: eval.py fits one on a pass of its own
    eval_cfg = compose_cfg(
        [f"ckpt_path={bare}", f"data.root={synthetic_root}", "data.eval_batch_size=100", "trainer.accelerator=cpu"],
        tmp_path / "eval",
        config_name="eval",
    )
    refit = evaluate(eval_cfg)
    assert refit["report"]["calibration"]["logits"] == "a validation pass at the test's start"
    assert refit["report"]["temperature"] == stored  # to the last bit
    for key in ("test/acc", "test/loss", "test/ece", "test/nll", "test/ece_calibrated", "test/nll_calibrated"):
        assert refit[key] == metrics[key], key
    for key in ("val_nll", "val_nll_calibrated"):
        assert refit["report"]["calibration"][key] == metrics["report"]["calibration"][key], key
