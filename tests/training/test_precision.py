"""``trainer.precision: auto``: the detection (mocked both ways), the override, and where the choice is recorded."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml
from helpers import compose_cfg, synthetic_overrides

from resnet_cifar.errors import ConfigError
from resnet_cifar.plain import to_dict
from resnet_cifar.run import train
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
