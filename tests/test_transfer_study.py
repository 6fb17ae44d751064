"""bench/transfer_study.py: its plan rule, and the whole study end to end on a tiny synthetic plan."""

from __future__ import annotations

import importlib.util
import json
import logging
import statistics
import sys
import time

import pytest
from helpers import REPO

_spec = importlib.util.spec_from_file_location("transfer_study", REPO / "bench" / "transfer_study.py")
study = sys.modules.setdefault("transfer_study", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(study)  # registered first: dataclasses look their module up


def test_plan_rule_on_the_real_split_sizes():
    """Batch 128, capped at MAX_STEPS (6 epochs x 185 steps): 50 / 250 / all labels per class of 5 classes."""
    p50, p250, pall = (
        study.make_plan(b, n, 5, 128, study.MAX_STEPS) for b, n in [("50", 250), ("250", 1250), ("all", 23_750)]
    )
    assert (p50.steps_per_epoch, p50.epochs, p50.steps) == (1, 100, 100)  # the MIN_STEPS floor
    assert (p250.steps_per_epoch, p250.epochs, p250.steps) == (9, 30, 270)  # 30 epochs over the budget
    assert (pall.steps_per_epoch, pall.epochs, pall.steps) == (185, 6, 1110)  # capped at MAX_STEPS
    assert (p50.unfreeze_at_epoch, p250.unfreeze_at_epoch, pall.unfreeze_at_epoch) == (10, 3, 1)
    assert (p50.warmup_epochs, p250.warmup_epochs, pall.warmup_epochs) == (10, 3, 1)
    with pytest.raises(SystemExit, match=r"budget 20 has 100 training images, fewer than one batch of 128"):
        study.make_plan("20", 100, 5, 128, study.MAX_STEPS)


def test_aggregate_is_the_mean_and_sample_std_over_seeds():
    runs = [
        {"test_acc": a, "seconds": t, "steps": 100, "seed": i}
        for i, (a, t) in enumerate([(0.5, 60), (0.7, 90), (0.6, 30)])
    ]
    agg = study.aggregate(runs)
    assert agg["mean"] == pytest.approx(0.6) and agg["std"] == pytest.approx(0.1)  # n-1: sqrt(0.02 / 2)
    assert (agg["min"], agg["max"], agg["seconds_mean"], agg["seconds_total"], agg["n"]) == (0.5, 0.7, 60, 180, 3)
    assert study.aggregate(runs[:1])["std"] == 0.0


def test_study_end_to_end_on_synthetic_data(synthetic_root, tmp_path, caplog):
    """Source, 2 budgets x 3 stages x 2 seeds, one finetune variant: cells, aggregate, table, README, plot."""
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{study.BEGIN}\nold numbers\n{study.END}\noutro\n")
    out = tmp_path / "study"
    args = [
        "--out", str(out), "--budgets", "10", "all", "--seeds", "0", "1", "--variants", "warmup",
        "--variant-budgets", "10", "--min-steps", "1", "--readme", str(readme),
        "--set", f"data.root={synthetic_root}", "data.strict_sizes=false", "data.val_size=100",
        "data.batch_size=25", "data.eval_batch_size=100", "data.image_size=16", "trainer.max_epochs=1", "logger=none",
        "~callbacks.lr_monitor",
    ]  # fmt: skip
    study.main(args)
    # 400 training images, 40 per class: source 200 images = 8 steps of 25 (1 epoch, --set; fewer break torch's
    # OneCycleLR); "10": 50 images, 2 steps/epoch, 30 epochs capped at the source's 8 steps = 4 epochs; "all":
    # 200 images, 8 steps/epoch, at least 2 epochs.
    results = json.loads((out / "results.json").read_text())
    assert results["source"]["steps"] == 8
    assert {b: p["steps"] for b, p in results["plans"].items()} == {"10": 8, "all": 16}
    expected = {f"{r}_{b}" for r in study.STAGES for b in ("10", "all")} | {"finetune-warmup_10"}
    assert set(results["cells"]) == expected
    for name in expected:
        runs = [json.loads((out / name / f"seed{s}" / "cell.json").read_text()) for s in (0, 1)]
        assert all(0.0 <= r["test_acc"] <= 1.0 and r["seconds"] > 0 for r in runs)
        assert all(r["load_peak"] >= r["load_before"] >= 0 and "cores" in r["machine"] for r in runs)
        assert [f"seed={s}" in r["overrides"] for s, r in zip((0, 1), runs)] == [True, True]
        cell = results["cells"][name]
        accs = [r["test_acc"] for r in runs]
        assert cell["mean"] == pytest.approx(statistics.fmean(accs))
        assert cell["std"] == pytest.approx(statistics.stdev(accs))
        assert cell["steps"] == results["plans"][name.rsplit("_", 1)[1]]["steps"]
    warm = json.loads((out / "finetune-warmup_10" / "seed0" / "cell.json").read_text())["overrides"]
    assert "stage.backbone_warmup_epochs=1" in warm and "stage.unfreeze_at_epoch=1" in warm

    text = readme.read_text()
    assert "old numbers" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    block = text.split(study.BEGIN)[1].split(study.END)[0]
    assert "| target stage | 10 / class | all (40) / class |" in block
    a = results["cells"]["scratch_10"]
    row = next(line for line in block.splitlines() if line.startswith("| `scratch` |"))
    assert f"{100 * a['mean']:.1f} ± {100 * a['std']:.1f} % (" in row and "8 steps)" in row
    assert "| finetune, backbone LR warm-up | " in block and "over seeds 0, 1" in block
    assert "| `finetune` (backbone LR x1, no warm-up) | " in block  # the row label reads the stage's defaults
    assert "Command: `python bench/transfer_study.py --out " in block and (out / "transfer_study.png").stat().st_size
    assert f"Machine: {results['source']['machine']}. 1-minute load average over 15 run(s)" in block

    # Run again: every (cell, seed) is kept, nothing trains, the same results come out.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="transfer_study"):
        study.main(args)
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[")]
    assert len(progress) == 15 and all("(kept)" in m for m in progress)
    assert progress[-1].startswith("[15/15] finetune_all seed 1 (kept)")
    assert json.loads((out / "results.json").read_text())["cells"] == results["cells"]
    study.main([*args, "--report-only"])  # reports the command that trains, not the report-only one
    again = readme.read_text().split(study.BEGIN)[1].split(study.END)[0]
    assert "--report-only" not in again and "Command: `python bench/transfer_study.py --out " in again


def test_load_peak_is_the_highest_sample_and_the_note_counts_unrecorded_runs(monkeypatch):
    loads = iter([0.3, 1.9, 4.2, 2.0] + [1.0] * 1000)
    monkeypatch.setattr(study.os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
    with study.LoadPeak(every_s=0.001) as load:
        time.sleep(0.05)  # ~50 samples
    assert load.peak == 4.2
    runs = {("scratch", "50"): [{"load_before": 0.4, "load_peak": 2.1}, {"load_before": 0.2, "load_peak": 3.5}]}
    note = study.load_note({"steps": 1}, runs)
    assert note.startswith("1-minute load average over 2 run(s): at most 0.40 when one started, peak 3.50")
    assert note.endswith(" 1 run(s) ran before the script recorded the load.")


def test_time_left_skips_runs_kept_from_an_earlier_session_and_scales_by_this_ones(caplog):
    """A resumed study: runs 1 and 3 finished earlier; the estimate counts only runs 2 and 4."""
    progress = study.Progress([60.0, 600.0, 600.0, 1200.0], kept=[True, False, True, False])
    with caplog.at_level(logging.INFO, logger="transfer_study"):
        progress.update("source", {"seconds": 60.0, "test_acc": 0.9})
        progress.update("a", {"seconds": 1200.0, "test_acc": 0.8})  # twice its prediction
        progress.update("b", {"seconds": 600.0, "test_acc": 0.8})
        progress.update("c", {"seconds": 2400.0, "test_acc": 0.8})
    left = [r.getMessage().rsplit("; ", 1)[1] for r in caplog.records]
    assert left == ["about 30 min left", "about 40 min left", "about 40 min left", "about 0 min left"]
