"""Bad inputs and failing outputs: each is one clear error, nothing runs that should not,
and nothing written before is damaged."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, compose_cfg, synthetic_overrides, synthetic_split
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from resnet_cifar import CONFIG_DIR
from resnet_cifar.cli import unwritable_reason
from resnet_cifar.config import validate_train_config
from resnet_cifar.data import cifar10
from resnet_cifar.errors import ConfigError, DataError, OutputError, WeightsError
from resnet_cifar.models.factory import build_model
from resnet_cifar.models.weights import safe_load
from resnet_cifar.plain import to_dict
from resnet_cifar.run import train, write_metrics
from resnet_cifar.schema import check_schema
from resnet_cifar.training.checkpointing import atomic_torch_save


class Payload:
    """Unpickling this object runs a shell command (creates a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    state = {"state_dict": {"backbone.w": torch.zeros(1)}, "loops": {}, "payload": Payload(marker)}
    torch.save(state, path)
    return path


def bad_data_root(tmp_path: Path, fault: str) -> Path:
    """A synthetic data root with one fault in data_batch_1."""
    root = tmp_path / f"data_{fault}"
    folder = cifar10.write_batches(root, synthetic_split(500, 0), synthetic_split(100, 1))
    batch = folder / "data_batch_1"
    if fault == "truncated":
        batch.write_bytes(batch.read_bytes()[:5000])
    elif fault == "garbage":
        batch.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    else:
        entry = {b"data": np.zeros((100, 3072), np.uint8), b"labels": [0] * 100}
        if fault == "shape":
            entry[b"data"] = np.zeros((100, 32, 32), np.uint8)
        elif fault == "labels":
            entry[b"labels"] = [0] * 99 + [10]
        elif fault == "code":
            entry[b"labels"] = Payload(tmp_path / "data_marker")
        with batch.open("wb") as f:
            pickle.dump(entry, f, protocol=2)
    return root


# ------------------------------------------------------------------ safe loading
def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(WeightsError, match="refused: it needs arbitrary unpickling"):
        safe_load(evil, "ckpt_path")
    with pytest.raises(WeightsError, match="refused"):
        build_model("resnet20", weights_path=str(evil))
    assert not marker.exists()
    # the check is not vacuous: an unrestricted load would have run the payload
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_weights_that_do_not_fit_name_the_mismatched_keys(tmp_path):
    own = build_model("resnet20").state_dict()
    wrong = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in own.items() if v.ndim}
    path = tmp_path / "wrong.pt"
    torch.save(wrong, path)
    with pytest.raises(WeightsError, match=r"does not fit this model's backbone \(shape mismatch: backbone\.\w+"):
        build_model("resnet20", weights_path=str(path))


@pytest.mark.parametrize("fault", ["truncated", "garbage", "shape", "labels", "code"])
def test_bad_batch_files_are_clear_data_errors(tmp_path, fault):
    root = bad_data_root(tmp_path, fault)
    expected = {
        "truncated": "unreadable or truncated",
        "garbage": "unreadable or truncated|not a CIFAR-10 batch",
        "shape": r"shape \(100, 32, 32\), expected uint8 of shape \(N, 3072\)",
        "labels": r"labels range 0\.\.10, expected 0\.\.9",
        "code": "refused: it references posix.system",
    }[fault]
    with pytest.raises(DataError, match=expected):
        cifar10.read_split(root / cifar10.FOLDER, cifar10.TRAIN_FILES)
    assert not (tmp_path / "data_marker").exists()


# ---------------------------------------------------------------- config checks
BAD_CONFIGS = [
    # (overrides, words the one-line message must contain)
    (["+data.batchsize=3"], ["data.batchsize", "not a known key", "batch_size"]),
    (["+trainer.max_epoch=3"], ["trainer.max_epoch", "not an argument"]),
    (["data.batch_size=abc"], ["data.batch_size='abc'", "an integer"]),
    (["data.batch_size=0"], ["data.batch_size=0", "[1, 65536]"]),
    (["optimizer.lr=-0.1"], ["optimizer.lr=-0.1", "(0, 10]"]),
    (["optimizer.lr=inf"], ["optimizer.lr=inf", "(0, 10]"]),
    (["data.val_size=60000"], ["data.val_size=60000", "[0, 49999]"]),
    (["data.train_per_class=0"], ["data.train_per_class=0", "[1, 5000]"]),
    (["trainer.max_epochs=0"], ["trainer.max_epochs=0", ">= 1"]),
    (["stage=finetune", "stage.unfreeze_at_epoch=-1"], ["stage.unfreeze_at_epoch=-1", "[0, 100000]"]),
    (["stage=finetune", "stage.unfreeze_at_epoch=5", "trainer.max_epochs=5", "model.weights_path=WEIGHTS"],
     ["stage.unfreeze_at_epoch=5", "trainer.max_epochs=5"]),
    (["stage=linear_probe"], ["stage=linear_probe", "pretrained", "model.weights_path"]),
    (["data.augment.cutout=40"], ["data.augment.cutout=40: expected an integer in [0, 32]"]),
    (["data.classes=[1,1]"], ["data.classes=[1, 1]", "distinct"]),
    (["data.augment.flip=maybe"], ["data.augment.flip='maybe'", "true/false"]),
    (["scheduler=cosine", "scheduler.warmup_epochs=4", "trainer.max_epochs=3"],
     ["scheduler.warmup_epochs=4", "<= trainer.max_epochs=3"]),
    (["data.val_size=0"], ["data.val_size=0", "callbacks.model_checkpoint.monitor"]),
    (["seed=-1"], ["seed=-1"]),
    (["model=resnet9", "model.stem=whiten"], ["model.stem=whiten", "24 channels", "model.widths[0]=24"]),
    (["model=resnet9", "model.ghost_batch=48"], ["model.ghost_batch=48", "data.batch_size=128"]),
    (["model=resnet9", "model.tails=[conv,skip,conv]"], ["model.tails[1]='skip'", "residual, conv, none"]),
    (["data.augment.padding_mode=edge"], ["data.augment.padding_mode='edge'", "zeros, reflect"]),
    (["optimizer=muon", "optimizer.muon_momentum=1"], ["optimizer.muon_momentum=1", "[0, 1)"]),
    (["module.tta_translate=9"], ["module.tta_translate=9", "[0, 8]"]),
    (["trainer=ddp_cpu", "trainer.sync_batchnorm=true", "module.compile=true"],
     ["module.compile=true with trainer.sync_batchnorm=true", "trainer.sync_batchnorm=false", "module.compile=false"]),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "words"), BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_bad_configs_fail_with_one_line_naming_key_value_and_range(tmp_path, overrides, words):
    weights = tmp_path / "w.pt"
    torch.save(build_model("resnet20").state_dict(), weights)
    overrides = [o.replace("WEIGHTS", str(weights)) for o in overrides]
    cfg = compose_cfg(["data.root=/nonexistent", *overrides], tmp_path / "run")
    with pytest.raises(ConfigError) as info:
        validate_train_config(cfg)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


@contextlib.contextmanager
def forget_hydra_config():
    """Leave no HydraConfig behind for the next test in this process (code asks it whether it runs under Hydra)."""
    try:
        yield
    finally:
        HydraConfig.instance().cfg = None


def test_every_shipped_config_option_passes_the_schema(tmp_path):
    """A key added to a conf/ file but not to resnet_cifar/schema.py fails here, not in a user's run."""
    validate_train_config(compose_cfg([], tmp_path / "run"))
    groups = [d for d in sorted(CONFIG_DIR.iterdir()) if d.is_dir() and d.name != "hydra"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"), forget_hydra_config():
        for group in groups:
            for option in sorted(group.glob("[!_]*.yaml")):
                # pretrained/imagenet_<stage> is chosen by a torchvision model with that stage
                choice = (
                    ["model=resnet18", f"stage={option.stem.removeprefix('imagenet_')}"]
                    if group.name == "pretrained"
                    else [f"{group.name}={option.stem}"]
                )
                cfg = compose("train", overrides=[*choice, f"paths.output_dir={tmp_path}"], return_hydra_config=True)
                HydraConfig.instance().set_config(cfg)  # ${hydra:...} (the search's callback) resolves as in a run
                cfg = cfg.copy()
                with open_dict(cfg):
                    del cfg["hydra"]
                check_schema(to_dict(cfg))
                if group.name == "debug":  # e.g. max_epochs=1 with the default warm-up
                    validate_train_config(cfg)


# -------------------------------------------------------------- failing outputs
def test_unwritable_output_directory(tmp_path):
    (tmp_path / "afile").write_text("x")
    assert "is a file" in unwritable_reason(tmp_path / "afile" / "run")
    assert unwritable_reason(tmp_path / "new" / "run") is None


def test_kill_during_checkpoint_write_leaves_last_ckpt_loadable(tmp_path):
    """The process dies (SIGKILL) halfway through writing the new last.ckpt: the old one stays whole."""
    path = tmp_path / "last.ckpt"
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from resnet_cifar.training.checkpointing import atomic_torch_save
        atomic_torch_save({{"step": 1, "w": torch.ones(1000)}}, {str(path)!r})
        real_save = torch.save
        def dying_save(obj, f):
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        atomic_torch_save({{"step": 2, "w": torch.zeros(1000)}}, {str(path)!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(1000))
    # the next save replaces it and clears the temporary file the killed write left behind
    assert list(tmp_path.glob(".last.ckpt.tmp-*"))
    atomic_torch_save({"step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 3
    assert not list(tmp_path.glob(".last.ckpt.tmp-*"))


def test_full_disk_while_saving_is_a_clear_error_and_keeps_earlier_outputs(synthetic_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    overrides = [
        *synthetic_overrides(synthetic_root),
        "trainer.max_epochs=1",
        "callbacks.last_checkpoint.every_n_train_steps=2",
        "callbacks.last_checkpoint.every_n_minutes=null",
        "logger=csv",
        "~callbacks.lr_monitor",
    ]
    real_save = torch.save
    saves = []

    def filling_save(obj, f, *args, **kwargs):
        saves.append(obj.get("global_step"))
        if len(saves) >= 3:  # the disk fills up during the third checkpoint (step 6)
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", filling_save)
    with pytest.raises(OutputError, match="cannot write checkpoint .*: the disk is full; checkpoints written before"):
        train(compose_cfg(overrides, out))
    monkeypatch.undo()
    assert saves == [2, 4, 6]
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)  # the step-4 checkpoint, whole
    assert last["global_step"] == 4 and "optimizer_states" in last
    assert not list((out / "checkpoints").glob(".*tmp*"))
    assert (out / "csv" / "metrics.csv").read_text().count("\n") > 1  # the logs so far are kept
    assert not (out / "metrics.json").exists()


def test_write_metrics_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_metrics(path, {"test/acc": 0.5})
    before = path.read_text()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # the data reach the disk at fsync: it is full
    with pytest.raises(OutputError, match=r"cannot write metrics .*metrics.json: the disk is full"):
        write_metrics(path, {"test/acc": 0.9})
    monkeypatch.undo()
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left


# ------------------------------------------- README's error table, through real runs
def readme_error_rows() -> list[str]:
    """The message column of README's "What the errors mean" table (the part after ``error: ``)."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("### What the errors mean") :].split("\n## ", 1)[0]
    return re.findall(r"^\| `error: ([^`]+)`", table, flags=re.M)


def message_pattern(row: str) -> str:
    """README's placeholders ``<...>`` and ``...`` stand for any text."""
    return "".join(
        ".+?" if p.startswith("<") or p == "..." else re.escape(p) for p in re.split(r"(<[^>]+>|\.\.\.)", row)
    )


# Rows that one command line cannot provoke (on a healthy machine, without an earlier sweep), and the test of each.
COVERED_ELSEWHERE = {
    "cannot write checkpoint": "test_full_disk_while_saving_is_a_clear_error_and_keeps_earlier_outputs",
    "<feature> needs": "test_commands.py::test_a_missing_extra_through_the_command_is_one_line",
    "hydra.sweep.dir=<dir> holds": "test_sweeps.py::test_killed_multirun_continues_where_it_stopped",
    "ckpt_path: the checkpoint's OneCycle": "test_train.py::test_resume_with_another_length_of_onecycle_is_refused",
}


def test_every_readme_error_row_through_a_real_run(synthetic_root, tmp_path):
    """Each row of README's error table, provoked as a user would: exit 2, that one `error:` line,
    no traceback, nothing run. A new row without a case here fails the test."""
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    (tmp_path / "afile").write_text("x")
    bad_shape = build_model("resnet20").state_dict()
    bad_shape["backbone.stem.0.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(bad_shape, tmp_path / "other_arch.pt")
    taken = tmp_path / "taken"
    atomic_torch_save({"state_dict": {}, "loops": {}}, taken / "checkpoints" / "last.ckpt")
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "resnet18-f37072fd.pth").write_bytes(b"not the official file")
    fast = [*synthetic_overrides(synthetic_root), "trainer.max_epochs=1", "logger=none", "~callbacks.lr_monitor"]
    cases = {  # README row prefix -> (overrides, extra environment)
        "<key>=<value>: expected": (["optimizer.lr=-1"], {}),
        "<key> is not a known key": (["+data.batchsize=3"], {}),
        "trainer.<key> is not an argument": (["+trainer.max_epoch=3"], {}),
        "stage=linear_probe starts from": (["stage=linear_probe"], {}),
        "stage.unfreeze_at_epoch=<n>": (
            ["stage=finetune", f"model.weights_path={tmp_path / 'afile'}", "stage.unfreeze_at_epoch=1"],
            {},
        ),
        "stage=linear_probe freezes": (["model=resnet18", "stage=linear_probe", "model.cifar_stem=true"], {}),
        "scheduler.progress=time": (["++scheduler.progress=time", "scheduler=cosine", "scheduler.warmup_epochs=0"], {}),
        "stage.backbone_warmup_epochs=<n> warms up": (["stage.backbone_warmup_epochs=1"], {}),
        "module.compile=true on a CPU": (["module.compile=true"], {"CXX": str(tmp_path / "no_such_compiler")}),
        "data.fold=<i> must be": (["data.num_folds=2", "data.fold=2"], {}),
        "<TORCH_HOME>/hub/checkpoints": (
            ["model=resnet18", "model.pretrained=true"],
            {"TORCH_HOME": str(tmp_path / "torch_home")},
        ),
        "ckpt_path <file> was refused": ([f"ckpt_path={evil}"], {}),
        "... is not a PyTorch checkpoint": ([f"ckpt_path={tmp_path / 'afile'}"], {}),
        "<file> does not fit": ([f"model.weights_path={tmp_path / 'other_arch.pt'}"], {}),
        "<batch file> is unreadable": ([f"data.root={bad_data_root(tmp_path, 'truncated')}"], {}),
        "<batch file> was refused": ([f"data.root={bad_data_root(tmp_path, 'code')}"], {}),
        "hydra.run.dir=<dir> cannot be used": ([f"hydra.run.dir={tmp_path / 'afile' / 'run'}"], {}),
        "<dir> already holds a run": ([f"hydra.run.dir={taken}"], {}),
        "hydra.sweeper.pruner=<name>": (["hparams_search=optuna", "hydra.sweeper.pruner=meadian"], {}),
    }
    rows = readme_error_rows()
    assert len(rows) >= len(cases)

    def run(row: str) -> tuple[str, subprocess.CompletedProcess]:
        overrides, env = next(v for k, v in cases.items() if row.startswith(k))
        run_dir = (
            []
            if any(o.startswith("hydra.run.dir") for o in overrides)
            else [f"hydra.run.dir={tmp_path / str(hash(row))}"]
        )
        cmd = [sys.executable, str(REPO / "train.py"), *fast, *overrides, *run_dir]
        full_env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HYDRA_FULL_ERROR": "0", **env}
        return row, subprocess.run(cmd, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=600)

    to_run = []
    for row in rows:
        if any(row.startswith(k) for k in COVERED_ELSEWHERE):
            continue
        assert any(row.startswith(k) for k in cases), f"README error row without a test case: {row!r}"
        to_run.append(row)
    with ThreadPoolExecutor(max_workers=2) as pool:  # subprocesses: two at a time on two cores
        results = list(pool.map(run, to_run))
    for row, proc in results:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 2 and len(errors) == 1, (row, proc.stderr[-3000:])
        assert re.match(message_pattern(row), errors[0].removeprefix("error: ")), (row, errors[0])
        assert "Traceback" not in proc.stderr, (row, proc.stderr[-3000:])
    assert not marker.exists() and not (tmp_path / "data_marker").exists()
