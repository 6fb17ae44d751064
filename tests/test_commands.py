"""The console commands: installed from the project's wheel (a regular `pip install .`), run from any
directory, with conf/ shipped inside the package; the preflight checks of the one runner."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from compose_all import compose_all
from helpers import CONF, REPO, compose_cfg, run_script, synthetic_overrides
from omegaconf import OmegaConf

from resnet_cifar import cli
from resnet_cifar.errors import MissingExtraError, require_extra

COMMANDS = ("resnet-cifar-train", "resnet-cifar-eval", "resnet-cifar-predict", "resnet-cifar-export")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built offline by this interpreter's pip and setuptools (the dev extra's).

    Built from a copy of what the build reads (no run outputs, no .venv, no build leftovers).
    """
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src_copy"
    for name in ("src", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp)]
    proc = subprocess.run([*pip, str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shutil.rmtree(src)  # the installed package must not depend on the checkout it came from
    (built,) = tmp.glob("resnet_cifar-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(tmp_path_factory, wheel) -> Path:
    """A venv with the project's wheel installed (a regular `pip install`, not editable); its bin/.

    The venv sees this interpreter's packages (torch etc.) through a .pth file listing its
    site-packages: an interpreter in a venv (the README's) or not (CI's). The .pth files of those
    folders are not run, so an editable install of this checkout there stays invisible.
    """
    venv = tmp_path_factory.mktemp("install") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    outer = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(purelib) / "_outer_site_packages.pth").write_text("\n".join(outer) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
    proc = subprocess.run([*pip, str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return venv / "bin"


def _run_installed(bin_dir: Path, command: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RESNET_CIFAR_LOGS")}
    return subprocess.run(
        [str(bin_dir / command), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_each_installed_command_answers_help(installed, tmp_path):
    keys = ("optimizer:", "ckpt_path:", "ckpt_path:", "ckpt_path:")
    for command, task, key in zip(COMMANDS, ("train", "eval", "predict", "export"), keys):
        proc = _run_installed(installed, command, "--help", cwd=tmp_path)
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
        assert f"{task} is powered by Hydra" in proc.stdout and key in proc.stdout, proc.stdout[:500]


def test_installed_train_runs_from_an_empty_directory(installed, synthetic_root, tmp_path):
    proc = _run_installed(
        installed,
        "resnet-cifar-train",
        *synthetic_overrides(synthetic_root),
        "++trainer.max_epochs=1",
        "++trainer.limit_train_batches=3",
        "run_name=pip",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "logs" / "train" / "runs" / "pip"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["model"]["name"] == "resnet20"  # composed from the configs inside the installed package
    where = subprocess.run(
        [str(installed / "python"), "-c", "import resnet_cifar; print(resnet_cifar.CONFIG_DIR)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert str(installed.parent) in where.stdout, where.stdout  # not the checkout's package


def test_the_wheel_ships_every_module_and_config(wheel):
    """pyproject.toml lists the packages (conf/ comes from outside src/): one left out fails here. The
    sweeper plugin goes into the shared hydra_plugins namespace, without an __init__.py of its own there."""
    src, conf = REPO / "src", REPO / "conf"
    expected = {p.relative_to(src).as_posix() for p in src.glob("*/**/*.py")}
    expected |= {f"resnet_cifar/conf/{p.relative_to(conf).as_posix()}" for p in conf.rglob("*.yaml")}
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith(("resnet_cifar/", "hydra_plugins/"))}
    assert shipped == expected, (sorted(expected - shipped), sorted(shipped - expected))
    assert "hydra_plugins/__init__.py" not in shipped
    assert "hydra_plugins/resnet_cifar_optuna_sweeper/config.py" in shipped


def test_an_editable_install_knows_the_search_sweeper(tmp_path):
    """`pip install -e .`: setuptools (>= 64) serves the packages through an import hook, which Hydra 1.3's
    plugin scan cannot list; the commands register the sweeper themselves (cli.register_sweeper_plugin)."""
    checkout = tmp_path / "checkout"
    for name in ("src", "conf"):
        shutil.copytree(REPO / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, checkout / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    outer = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(purelib) / "_outer_site_packages.pth").write_text("\n".join(outer) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-build-isolation"]
    proc = subprocess.run([*pip, "-e", str(checkout)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _run_installed(venv / "bin", "resnet-cifar-train", "hparams_search=optuna", "--cfg", "hydra", cwd=empty)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sweeper = yaml.safe_load(proc.stdout)["hydra"]["sweeper"]
    assert sweeper["_target_"] == "hydra_plugins.resnet_cifar_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    check = (
        "from hydra.core.plugins import Plugins; from hydra.plugins.sweeper import Sweeper; "
        "from resnet_cifar import cli; cli.register_sweeper_plugin(); "
        "print([c.__module__ for c in Plugins.instance().discover(Sweeper)], cli.__file__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(python), "-c", check], cwd=empty, env=env, capture_output=True, text=True)
    assert "hydra_plugins.resnet_cifar_optuna_sweeper.optuna_sweeper" in proc.stdout, proc.stderr[-2000:]
    assert str(checkout / "src" / "resnet_cifar" / "cli.py") in proc.stdout  # the editable copy, not this checkout


def test_the_installed_package_composes_every_config_group(installed, tmp_path):
    """From an empty directory, the wheel's configs compose every option exactly as the checkout's conf/."""
    proc = subprocess.run(
        [str(installed / "python"), str(REPO / "tests" / "compose_all.py")],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert Path(result["config_dir"]).is_relative_to(installed.parent), result["config_dir"]  # the packaged copy
    expected = compose_all(REPO / "conf")
    assert sorted(result["composed"]) == sorted(expected)
    for choice, cfg in expected.items():
        assert result["composed"][choice] == cfg, choice
    # the command a user types
    proc = _run_installed(installed, "resnet-cifar-train", "--cfg", "job", "model=resnet32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert yaml.safe_load(proc.stdout) == {k: v for k, v in expected["model/resnet32"].items() if k != "hydra"}
    assert not any(tmp_path.iterdir())  # --cfg writes nothing


def test_finetune_composes_the_weights_preprocessing_and_lr(tmp_path):
    proc = run_script("train.py", "model=resnet18", "stage=finetune", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["data"]["mean"] == [0.485, 0.456, 0.406] and cfg["data"]["std"] == [0.229, 0.224, 0.225]
    assert cfg["data"]["image_size"] > 32
    # the backbone at the head's LR: the stage's default, the transfer study's finding
    assert cfg["optimizer"]["lr"] == 0.01 and cfg["stage"]["backbone_lr_ratio"] == 1.0
    # From scratch, and for the CIFAR ResNets, CIFAR-10's own statistics and 32x32 stay, and the default LR.
    scratch_lr = OmegaConf.load(CONF / "optimizer" / "sgd.yaml").lr
    for args in (["model=resnet18"], ["model=resnet20", "stage=finetune"], ["model=resnet50", "stage=linear_probe"]):
        cfg = compose_cfg(args, tmp_path)
        imagenet = args[-1] == "stage=linear_probe"
        assert list(cfg.data.mean) == ([0.485, 0.456, 0.406] if imagenet else [0.4914, 0.4822, 0.4465]), args
        assert cfg.data.image_size == (64 if imagenet else 32) and cfg.optimizer.lr == scratch_lr, args
    # What the user gives wins over what the weights suggest, and so does an experiment preset.
    cfg = compose_cfg(["model=resnet18", "stage=finetune", "data.image_size=32", "optimizer.lr=0.003"], tmp_path)
    assert cfg.data.image_size == 32 and cfg.optimizer.lr == 0.003
    assert compose_cfg(["experiment=resnet18_linear_probe"], tmp_path).optimizer.lr == 0.1


def test_a_choice_that_needs_a_missing_extra_names_it(monkeypatch):
    with pytest.raises(MissingExtraError, match=r"pip install 'resnet-cifar\[search\]'"):
        require_extra(("optuna", "no_such_module_for_this_test"), "search", "hparams_search=optuna")
    require_extra(("json",), "search", "anything")  # present: no error
    monkeypatch.setattr(cli, "EXTRAS", (("hydra/launcher=", ("no_such_module_for_this_test",), "cluster"),))
    message = cli.preflight(["hydra/launcher=slurm", "model=resnet20"])
    assert message and "resnet-cifar[cluster]" in message and "hydra/launcher=slurm" in message
    assert cli.preflight(["model=resnet20"]) is None


def test_a_missing_extra_through_the_command_is_one_line(tmp_path):
    """export to ONNX without onnxruntime: simulated by a package of that name that fails to import."""
    hide = tmp_path / "hide"
    (hide / "onnxruntime").mkdir(parents=True)
    (hide / "onnxruntime" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env_path = f"{hide}{os.pathsep}{REPO / 'src'}"
    proc = subprocess.run(
        [sys.executable, str(REPO / "export.py"), f"ckpt_path={tmp_path / 'x.ckpt'}", f"hydra.run.dir={tmp_path}/o"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": env_path},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pip install 'resnet-cifar[export]'" in proc.stderr and "Traceback" not in proc.stderr


def test_lr_finder_writes_a_plot_and_a_finite_suggestion(synthetic_root, tmp_path):
    from resnet_cifar.tune import suggest_lr

    out = tmp_path / "lr_find"
    overrides = [*synthetic_overrides(synthetic_root), "tune=lr_find", "tune.num_training=30", f"hydra.run.dir={out}"]
    proc = run_script("train.py", *overrides, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "lr_find.json").read_text())
    assert len(result["lr"]) == len(result["loss"]) >= 12
    assert result["lr"] == sorted(result["lr"])
    # the curve starts at tune.min_lr (its first step, or the one after: an exponential step is (max/min)^(1/29))
    step = (result["max_lr"] / result["min_lr"]) ** (1 / (result["num_training"] - 1))
    assert result["min_lr"] == 1e-5 and 1e-5 <= result["lr"][0] <= 1e-5 * step * 1.001, result["lr"][:2]
    # the suggestion is the project's rule (the lowest debiased loss's LR / 10) applied to the written curve
    assert result["suggestion"] == suggest_lr(result["lr"], result["loss"])
    assert result["override"] == f"optimizer.lr={result['suggestion']:.3g}" and result["override"] in proc.stdout
    assert (out / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "checkpoints").exists()  # a range test, not a training run


def test_lr_finder_losses_are_debiased_to_the_real_running_average():
    """Lightning's own smoothing of a constant loss, corrected: the curve is flat at that loss."""
    import torch
    from pytorch_lightning.tuner.lr_finder import _LRCallback

    from resnet_cifar.tune import debias_smoothed_losses

    class Trainer:  # what _LRCallback.on_train_batch_end reads
        accumulate_grad_batches, should_stop, global_step = 1, False, 0
        fit_loop = type("FitLoop", (), {"batch_idx": 0})()
        strategy = type("Strategy", (), {"broadcast": staticmethod(lambda x: x)})()

    callback, trainer = _LRCallback(num_training=60, early_stop_threshold=None), Trainer()
    for _ in range(60):
        trainer.global_step += 1  # the optimizer step happens before on_train_batch_end
        callback.on_train_batch_end(trainer, None, torch.tensor(2.3), None, 0)
    assert callback.losses[0] < 1.2  # Lightning's curve starts at about half the loss (its bug)
    assert debias_smoothed_losses(callback.losses) == pytest.approx([2.3] * 60, rel=1e-6)


def test_lr_suggestion_is_a_tenth_of_the_lr_at_the_lowest_loss():
    from resnet_cifar.tune import suggest_lr

    lrs = [10.0**e for e in range(-6, 2)]  # 1e-6 .. 10
    losses = [2.3, 2.3, 2.31, 2.2, 1.9, 1.5, 1.7, float("nan")]
    assert suggest_lr(lrs, losses, skip_begin=0) == pytest.approx(0.01)  # lowest loss at 0.1
    assert suggest_lr(lrs, [0.1, *losses[1:]], skip_begin=1) == pytest.approx(0.01)  # early points skipped
    assert suggest_lr(lrs, [float("nan")] * 8, skip_begin=0) is None
