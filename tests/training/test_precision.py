"""``trainer.precision: auto``: the detection (mocked both ways, and unmocked on the machine the suite runs on),
the override, where the choice is recorded, and eval.py repeating a bf16 run's numbers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from helpers import compose_cfg, synthetic_overrides

from resnet_cifar.errors import ConfigError
from resnet_cifar.plain import to_dict
from resnet_cifar.run import evaluate, train
from resnet_cifar.schema import check_schema
from resnet_cifar.training import precision as prec


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def _flags(monkeypatch, flags: set[str]) -> None:
    monkeypatch.setattr(prec, "cpu_flags", lambda *a: set(flags))


@pytest.mark.parametrize(
    ("flags", "expected", "reason"),
    [
        ({"avx2", "amx_tile", "amx_bf16", "avx512_bf16"}, "bf16-mixed", "AMX-BF16"),
        ({"avx2", "avx512f", "avx512_bf16"}, "bf16-mixed", "AVX512-BF16"),
        ({"avx2", "fma", "avx512f"}, "32-true", "without AMX-BF16 or AVX512-BF16"),
        (set(), "32-true", "without"),
    ],
)
@pytest.mark.parametrize("accelerator", ["auto", "cpu"])
def test_auto_on_a_cpu_follows_its_bf16_instructions(monkeypatch, cpu_only, flags, expected, reason, accelerator):
    _flags(monkeypatch, flags)
    precision, why = prec.resolve_precision("auto", accelerator)
    assert precision == expected and reason in why


@pytest.mark.parametrize(
    ("capability", "expected"), [((9, 0), "bf16-mixed"), ((8, 0), "bf16-mixed"), ((7, 5), "16-mixed")]
)
def test_auto_on_a_cuda_gpu_follows_its_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA Test GPU")
    _flags(monkeypatch, {"amx_bf16"})  # the CPU plays no part when a GPU trains
    precision, why = prec.resolve_precision("auto", "gpu")
    assert precision == expected and "NVIDIA Test GPU" in why and f"{capability[0]}.{capability[1]}" in why
    # trainer=cpu on the same machine: the CPU decides
    assert prec.resolve_precision("auto", "cpu")[0] == "bf16-mixed"


@pytest.mark.parametrize("explicit", ["32-true", "bf16-mixed", "16-mixed", "64-true"])
def test_an_explicit_precision_always_wins(monkeypatch, explicit):
    _flags(monkeypatch, {"amx_bf16"})
    assert prec.resolve_precision(explicit, "cpu") == (explicit, "set in the config")


def test_cpu_flags_fall_back_to_cpuinfo_where_torch_lacks_get_capabilities(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse avx2 amx_bf16 amx_tile\n\n")
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)  # torch < 2.14 (the GPU machine's 2.11)
    assert {"avx2", "amx_bf16", "amx_tile"} <= prec.cpu_flags(cpuinfo)
    assert prec.cpu_flags(tmp_path / "missing") == set()


def test_cpu_flags_read_torchs_capabilities(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True, "avx512_bf16": False}, raising=False)
    assert prec.cpu_flags(tmp_path / "missing") == {"amx_bf16"}


def test_an_unknown_precision_is_a_one_line_config_error(tmp_path):
    cfg = to_dict(compose_cfg(["trainer.precision=fp8"], tmp_path))
    with pytest.raises(ConfigError, match=r"^trainer.precision='fp8': expected one of auto, .*bf16-mixed.*32-true"):
        check_schema(cfg)


@pytest.mark.parametrize(
    ("flags", "override", "expected"),
    [
        ({"amx_bf16"}, [], "bf16-mixed"),  # an AMX machine: bf16 without being asked
        ({"avx2"}, [], "32-true"),  # a CPU without bf16 instructions
        ({"amx_bf16"}, ["trainer.precision=32-true"], "32-true"),  # the user's choice wins
    ],
)
def test_the_run_records_the_precision_it_trained_with(
    monkeypatch, cpu_only, synthetic_root, tmp_path, caplog, flags, override, expected
):
    _flags(monkeypatch, flags)
    overrides = [*synthetic_overrides(synthetic_root, precision=None), "trainer.max_epochs=1"]
    overrides += ["trainer.limit_train_batches=2"]
    overrides += ["trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "report=none", "logger=csv"]
    cfg = compose_cfg([*overrides, *override], tmp_path)
    with caplog.at_level(logging.INFO, logger="resnet_cifar"):
        metrics = train(cfg)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["precision"] == metrics["precision"] == expected
    assert f"precision {expected}: {written['precision_reason']}" in caplog.text
    if override:
        assert written["precision_reason"] == "set in the config"
    # the loggers' hyperparameters carry the precision that ran, not "auto"
    hparams = yaml.safe_load(next(tmp_path.rglob("hparams.yaml")).read_text())
    assert hparams["trainer.precision"] == expected


def cpuinfo_flags() -> set[str]:
    """The CPU's flags as Linux lists them, read here without the code under test."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads Linux's /proc/cpuinfo")
def test_auto_on_this_machine_unmocked(synthetic_root, tmp_path):
    """Nothing patched: if torch's capability names or the code's keys drifted apart (cpu_flags swallows any
    error), a bf16 CPU would quietly train in fp32. On the machine the suite runs on, auto is bf16-mixed exactly
    when /proc/cpuinfo lists AMX-BF16 or AVX512-BF16, and train.py's Trainer then trains under bf16 autocast."""
    bf16 = bool({"amx_bf16", "avx512_bf16"} & cpuinfo_flags())
    expected = "bf16-mixed" if bf16 else "32-true"
    assert prec.resolve_precision("auto", "cpu")[0] == expected
    probe = tmp_path / "precision.json"
    overrides = [*synthetic_overrides(synthetic_root, precision=None), "trainer.max_epochs=1"]
    overrides += ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    overrides += ["report=none", "logger=none", "scheduler=cosine", "scheduler.warmup_epochs=0"]
    overrides += ["+callbacks.probe._target_=probes.PrecisionProbe", f"+callbacks.probe.out={probe}"]
    metrics = train(compose_cfg(overrides, tmp_path))
    assert metrics["precision"] == expected
    seen = json.loads(probe.read_text())
    assert seen["precision"] == expected
    assert seen["plugin"] == ("MixedPrecision" if bf16 else "Precision")
    assert seen["head_dtypes"] == ["torch.bfloat16" if bf16 else "torch.float32"] * 2  # the two training steps
    for ckpt in (tmp_path / "checkpoints").glob("*.ckpt"):  # the best and last.ckpt: what eval.py's auto reads
        assert torch.load(ckpt, weights_only=True)["resnet_cifar_precision"] == expected, ckpt.name


@pytest.fixture(scope="module")
def bf16_run(synthetic_root, tmp_path_factory) -> dict:
    """train()'s metrics of a one-epoch bf16-mixed run (its best_ckpt records the precision)."""
    tmp_path = tmp_path_factory.mktemp("bf16_run")
    overrides = [*synthetic_overrides(synthetic_root, precision="bf16-mixed"), "trainer.max_epochs=1"]
    trained = train(compose_cfg([*overrides, "logger=none", "module.tta_flip=true"], tmp_path / "run"))
    assert trained["precision"] == "bf16-mixed"
    return trained


def _eval_base(ckpt: Path, synthetic_root: Path) -> list[str]:
    return [f"ckpt_path={ckpt}", f"data.root={synthetic_root}", "report.loggers=false"]


def test_eval_auto_repeats_a_bf16_runs_test_numbers(monkeypatch, cpu_only, synthetic_root, tmp_path, bf16_run):
    """A bf16-mixed checkpoint evaluated on a CPU with bf16 instructions (mocked): eval.py's auto is the checkpoint's
    precision, so it repeats the training run's numbers, which fp32 would not."""
    trained = bf16_run
    _flags(monkeypatch, {"amx_bf16"})
    base = _eval_base(trained["best_ckpt"], synthetic_root)
    evaluated = evaluate(compose_cfg(base, tmp_path / "eval", "eval"))
    assert evaluated["precision"] == "bf16-mixed"
    assert evaluated["precision_reason"] == "as the checkpoint was trained and tested"
    for key in ("test/acc", "test/loss", "test/top5", "test/ece", "test/nll", "test/ece_calibrated"):
        assert evaluated[key] == pytest.approx(trained[key], rel=1e-6, abs=1e-7), key
    fp32 = evaluate(compose_cfg([*base, "trainer.precision=32-true"], tmp_path / "fp32", "eval"))
    assert fp32["precision"] == "32-true"
    assert fp32["test/loss"] != pytest.approx(trained["test/loss"], rel=1e-6)  # so the comparison above can fail


@pytest.mark.parametrize(
    ("trained", "flags", "expected", "reason"),
    [
        ("bf16-mixed", {"avx2"}, "32-true", "the checkpoint's bf16-mixed would be emulated on a CPU without AMX"),
        ("16-mixed", {"avx2"}, "32-true", "the checkpoint's 16-mixed has no float16 autocast on a CPU"),
        ("16-mixed", {"amx_bf16"}, "bf16-mixed", "the checkpoint's 16-mixed has no float16 autocast on a CPU"),
        ("32-true", {"amx_bf16"}, "32-true", "as the checkpoint was trained and tested"),
    ],
    ids=["bf16_on_a_cpu_without_bf16", "fp16_on_a_cpu", "fp16_on_a_bf16_cpu", "fp32_on_a_bf16_cpu"],
)
def test_eval_auto_takes_the_checkpoints_precision_only_where_the_device_runs_it_natively(
    monkeypatch, cpu_only, synthetic_root, tmp_path, bf16_run, trained, flags, expected, reason
):
    """Elsewhere it is the device's own auto (emulated bf16 is ~10x slower, Lightning has no float16 autocast on a
    CPU), and metrics.json says what ran and why; an fp32 checkpoint stays fp32 on a bf16 CPU."""
    state = torch.load(bf16_run["best_ckpt"], weights_only=True)
    state["resnet_cifar_precision"] = trained
    ckpt = tmp_path / f"{trained}.ckpt"
    torch.save(state, ckpt)
    _flags(monkeypatch, flags)
    evaluate(compose_cfg(_eval_base(ckpt, synthetic_root), tmp_path / "eval", "eval"))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["precision"] == expected
    assert metrics["precision_reason"].startswith(reason)
    if expected != trained:
        assert metrics["precision_reason"].endswith(prec.resolve_precision("auto", "cpu")[1])


def test_checkpoint_auto_on_a_gpu_without_bf16(monkeypatch):
    """A bf16 checkpoint on a pre-Ampere GPU: its own auto (16-mixed); a GPU runs float16 natively."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA Test GPU")
    precision, reason = prec.checkpoint_auto("bf16-mixed", "gpu")
    assert precision == "16-mixed"
    assert reason.startswith("the checkpoint's bf16-mixed needs compute capability >= 8.0, this GPU has 7.0")
    assert prec.checkpoint_auto("16-mixed", "gpu") == ("16-mixed", "as the checkpoint was trained and tested")
    assert prec.checkpoint_auto(None, "gpu") is None
