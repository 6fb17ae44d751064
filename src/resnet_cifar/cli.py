"""The four commands and the one runner that wraps them.

``resnet-cifar-train``, ``-eval``, ``-predict`` and ``-export`` (and the ``train.py`` ... scripts of
a checkout, which call them) are Hydra apps over the configs of ``conf/`` (``resnet_cifar.CONFIG_DIR``).
Each goes through :func:`command`: checks on the command line before Hydra creates the run
directory (:func:`preflight`), then :func:`run_task`, which turns user errors into one line on
stderr and a non-zero exit, records every outcome in ``status.json`` and handles SIGTERM.

In a Hydra multirun a failing job must not end the sweep: the failure is recorded in the
job's ``status.json`` (see :mod:`resnet_cifar.sweeps`) and the job returns ``failed_value``;
the sweep exits non-zero at its end (``SweepReport``). The same multirun run again in the same
``hydra.sweep.dir`` continues it: each training job skips itself if it completed, and resumes
from its ``last.ckpt`` if it was interrupted (:func:`continue_sweep_job`).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from resnet_cifar import CONFIG_DIR
from resnet_cifar.errors import UserError, require_extra
from resnet_cifar.progress import show_progress
from resnet_cifar.sweeps import (
    COMPLETED,
    PRUNED,
    RUNNING,
    EarlierAttempt,
    SweepConflict,
    earlier_attempt,
    failed_objective,
    in_multirun,
    write_status,
)

log = logging.getLogger("resnet_cifar")

# ${resnet_cifar.either:A,B}: A unless it is null, else B (the run directory: run_name or the start time).
# OmegaConf's oc.select falls back only for a missing key, not for a null one: it named every unnamed run "None".
OmegaConf.register_new_resolver("resnet_cifar.either", lambda a, b: b if a is None else a, replace=True)
EXIT_USER_ERROR = 2
EXIT_TERMINATED = 128 + 15  # the shell's status of a process ended by SIGTERM: not finished, resumable

# Writing an output failed for a reason the user can fix (space, quota, permissions, read-only).
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def _loaded_exception(module: str, name: str) -> type[BaseException] | None:
    """The exception class ``module.name`` if its module (Lightning's, Optuna's) is already imported, else None.

    Lightning is imported only when a task needs it (~6 s here): ``--help``, tab completion (run
    at every TAB) and a config error answer without it, and an exception raised before Lightning
    was imported cannot be one of Lightning's (nor, before Optuna was, one of Optuna's).
    """
    loaded = sys.modules.get(module)
    return getattr(loaded, name, None) if loaded is not None else None


def _user_errors() -> tuple[type[BaseException], ...]:
    misconfiguration = _loaded_exception("lightning_fabric.utilities.exceptions", "MisconfigurationException")
    return (UserError, OmegaConfBaseException, *([misconfiguration] if misconfiguration else []))


def _user_error_message(e: BaseException) -> str | None:
    """The one-line message of a user error behind ``e`` (incl. a Hydra ``instantiate`` cause), else None."""
    user_errors = _user_errors()
    if isinstance(e, InstantiationException) and isinstance(e.__cause__, user_errors):
        e = e.__cause__
    if isinstance(e, user_errors):
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, OSError) and e.errno in OUTPUT_ERRNOS:
        return f"cannot write {e.filename or 'an output file'}: {e.strerror}; outputs written before are intact"
    return None


def run_task(
    task: Callable[..., Any], *args: Any, failed_value: Any = None, status: dict[str, Any] | None = None
) -> Any:
    """Run ``task``; on a user error print ``error: <message>`` and exit with status 2.

    Every outcome is written to the run directory's ``status.json`` (``running`` first, so that a
    job killed outright leaves its overrides; ``status``: more fields for every write). In a
    multirun, a user error or a crash is logged and recorded, and ``failed_value`` returned, so
    the sweep goes on. A trial that an Optuna search pruned is recorded ``pruned`` and its
    ``optuna.TrialPruned`` raised on: Hydra hands it to the sweeper in the job's return.
    """

    def write(state: str, error: BaseException | None = None, message: str | None = None) -> None:
        write_status(state, error, message, status)

    write(RUNNING)
    try:
        result = task(*args)
    except SystemExit as exc:  # Lightning's SIGTERMException is a SystemExit
        sigterm = _loaded_exception("pytorch_lightning.utilities.exceptions", "SIGTERMException")
        if sigterm is None or not isinstance(exc, sigterm):
            raise
        # Lightning stopped at a batch end; LastCheckpoint has saved last.ckpt
        log.warning("Stopped by SIGTERM")
        write("terminated", exc, "stopped by SIGTERM (signal 15); resumable with ckpt_path=last")
        sys.exit(EXIT_TERMINATED)
    except Exception as exc:
        pruned = _loaded_exception("optuna.exceptions", "TrialPruned")
        if pruned is not None and isinstance(exc, pruned):
            log.info("Trial pruned %s", exc)
            write_status(PRUNED, extra={**(status or {}), "pruned": str(exc)})
            raise
        message = _user_error_message(exc)
        if message is None:  # a crash: keep its traceback
            write("failed", exc, f"{type(exc).__name__}: {exc}".strip().splitlines()[0])
            if not in_multirun():
                raise
            log.exception("Job failed; the sweep goes on")
            return failed_value
        log.error(message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        write("failed", exc, message)
        if in_multirun():
            return failed_value
        sys.exit(EXIT_USER_ERROR)
    write(COMPLETED)
    return result


# Output directories the command line may name; Hydra creates them before the task starts.
DIR_KEYS = ("hydra.run.dir", "hydra.sweep.dir", "paths.log_dir")
# Config choices that need an optional dependency group: (``group=`` for any option of the group, or
# ``group=option``, also found in a list such as ``logger=[tensorboard,mlflow]``; modules; extra).
EXTRAS = (
    ("hparams_search=", ("optuna", "sqlalchemy"), "search"),
    ("hydra/sweeper=optuna", ("optuna", "sqlalchemy"), "search"),
    ("hydra/launcher=", ("submitit", "hydra_plugins.hydra_submitit_launcher"), "cluster"),
    # mlflow-skinny's SQLite store (conf/logger/mlflow.yaml) runs on SQLAlchemy and Alembic
    ("logger=mlflow", ("mlflow", "sqlalchemy", "alembic"), "mlflow"),
    ("logger=wandb", ("wandb",), "wandb"),
)


def selects(arg: str, choice: str) -> bool:
    """Whether the override ``arg`` selects ``choice`` (an :data:`EXTRAS` entry); ``null`` selects nothing."""
    key, _, value = arg.lstrip("+").partition("=")
    group, _, option = choice.partition("=")
    if key != group or not value or value == "null":
        return False
    return not option or option in [v.strip() for v in value.strip("[]").split(",")]


def output_dirs(argv: Sequence[str]) -> list[tuple[str, str]]:
    """``(key, directory)`` pairs the run will create, as far as the command line tells (no interpolations)."""
    found = []
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if sep and key in DIR_KEYS and value and "${" not in value:
            found.append((key, value))
    if not any(k.startswith("hydra.") for k, _ in found):  # the run directory goes under paths.log_dir
        if not any(k == "paths.log_dir" for k, _ in found):
            found.append(("paths.log_dir", os.environ.get("RESNET_CIFAR_LOGS", "logs")))
    else:
        found = [(k, v) for k, v in found if k.startswith("hydra.")]
    return found


def unwritable_reason(directory: str | os.PathLike) -> str | None:
    """Why ``directory`` cannot be created or written to, or None if it can."""
    path = Path(directory).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def preflight(argv: Sequence[str]) -> str | None:
    """The ``error:`` message for a command line that cannot run, found before Hydra starts.

    Hydra creates ``hydra.run.dir`` (and writes its config there) before the task starts and
    reports a failure to do so, or a sweeper/launcher plugin that is not installed, with a
    traceback; these checks say it in one line instead.
    """
    for key, directory in output_dirs(argv):
        reason = unwritable_reason(directory)
        if reason:
            return f"{key}={directory} cannot be used as an output directory: {reason}; choose another directory"
    try:
        show_progress()  # a bad RESNET_CIFAR_PROGRESS value, said before anything starts
    except UserError as e:
        return str(e)
    for prefix, modules, extra in EXTRAS:
        choice = next((a for a in argv if selects(a, prefix)), None)
        if choice:
            try:
                require_extra(modules, extra, choice.lstrip("+"))
            except UserError as e:
                return str(e)
    return None


SWEEPER_PLUGIN = "hydra_plugins.resnet_cifar_optuna_sweeper"


def register_sweeper_plugin() -> None:
    """Make sure Hydra knows the project's sweeper (``hydra/sweeper=optuna``), however the package was installed.

    Hydra 1.3 finds plugins by listing the ``hydra_plugins`` namespace package, which an editable
    install by setuptools >= 64 (PEP 660) exposes through an import hook that cannot be listed
    (Hydra issues #2359 and #3252; entry-point discovery comes with Hydra 1.4). The modules still
    import: when the scan missed the sweeper, register it by hand (its ``config`` module stores
    ``hydra/sweeper/optuna`` as it is imported).
    """
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    plugins = Plugins.instance()
    if any(c.__module__.startswith(SWEEPER_PLUGIN + ".") for c in plugins.discover(Sweeper)):
        return
    from hydra_plugins.resnet_cifar_optuna_sweeper import config, optuna_sweeper  # noqa: F401

    plugins.register(optuna_sweeper.OptunaSweeper)


def continue_sweep_job(cfg: Any) -> tuple[EarlierAttempt | None, dict[str, Any]]:
    """Continue this multirun job from what an earlier run of the same sweep left in its directory.

    Returns ``(completed, status fields)``: ``completed`` is the earlier attempt if it completed
    (skip the job, leave its files as they are), else None; then, if the job's directory holds a
    last checkpoint (killed, stopped or crashed mid-run), ``cfg.ckpt_path`` becomes ``last`` and
    the status records ``resumed_from``. A directory that holds another job's results stops the
    sweep (exit 2) before anything of that job is overwritten.
    """
    hc = HydraConfig.get()
    try:
        earlier = earlier_attempt(hc.runtime.output_dir, list(hc.overrides.task))
    except SweepConflict as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    if earlier is None:
        return None, {}
    if earlier.status == COMPLETED:
        log.info("Job %s completed in an earlier run of this sweep: skipped (its results are kept)", hc.job.num)
        return earlier, {}
    from resnet_cifar.training.checkpointing import find_last_checkpoint

    found = find_last_checkpoint(cfg.paths.output_dir, OmegaConf.select(cfg, "callbacks.last_checkpoint.dirpath"))
    if found is None:
        log.info("Job %s (%s in an earlier run of this sweep) starts again: no checkpoint", hc.job.num, earlier.status)
        return None, {}
    log.info("Job %s (%s in an earlier run of this sweep) resumes from %s", hc.job.num, earlier.status, found)
    cfg.ckpt_path = "last"  # the job's own progress, whatever checkpoint it started from
    return None, {"resumed_from": str(found)}


def command(
    task: Callable[[Any], Any], config_name: str, objective: Callable[[Any, dict[str, float]], Any] | None = None
) -> Callable[[], Any]:
    """A console command: :func:`preflight`, then the Hydra app ``config_name`` running ``task``.

    ``objective`` makes the command sweepable: in a multirun a failed job returns the sweeper's
    worst value (:func:`~resnet_cifar.sweeps.failed_objective`) instead of stopping the other
    jobs, and a rerun of the sweep continues it (:func:`continue_sweep_job`); a job that completed
    earlier returns ``objective(cfg, its stored metrics)`` without running again.
    """

    # An absolute path: the same configs from a checkout, an editable or a regular install.
    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)
    def app(cfg: Any) -> Any:
        if objective is None or not in_multirun():
            return run_task(task, cfg)
        completed, status = continue_sweep_job(cfg)
        if completed is not None:
            return objective(cfg, completed.metrics) if completed.metrics else None
        return run_task(task, cfg, failed_value=failed_objective(), status=status)

    def main() -> Any:
        register_sweeper_plugin()
        message = None if any(a in ("-h", "--help", "--hydra-help") for a in sys.argv[1:]) else preflight(sys.argv[1:])
        if message:
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        return app()

    main.__doc__ = f"Hydra app over conf/{config_name}.yaml running {task.__module__}.{task.__name__}."
    return main


def _train(cfg: Any) -> Any:
    from resnet_cifar.config import validate_train_config

    validate_train_config(cfg)  # before Lightning's import: a bad value is reported in seconds
    if cfg.get("tune"):  # tune=lr_find: the LR range test instead of training
        from resnet_cifar.tune import lr_find

        lr_find(cfg)
        return None
    from resnet_cifar.run import objective, train

    return objective(cfg, train(cfg))


def _objective(cfg: Any, metrics: dict[str, float]) -> Any:
    from resnet_cifar.run import objective

    return objective(cfg, metrics)


def _evaluate(cfg: Any) -> Any:
    from resnet_cifar.run import evaluate

    return evaluate(cfg)


def _predict(cfg: Any) -> Any:
    from resnet_cifar.inference import predict

    return predict(cfg)


def _export(cfg: Any) -> Any:
    from resnet_cifar.export import export

    return export(cfg)


# Imported lazily inside the tasks so that `--help` answers at once.
train = command(_train, "train", objective=_objective)
evaluate = command(_evaluate, "eval")
predict = command(_predict, "predict")
export = command(_export, "export")
