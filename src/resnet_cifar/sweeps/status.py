"""Each job's ``status.json``: written by the job, read back by the sweep's reports.

Every job of a Hydra run or multirun leaves ``status.json`` in its directory (rank zero only),
with the job's overrides: ``running`` from its start (still so after a SIGKILL), then
``completed``, ``pruned`` (an Optuna search stopped it early: it ended, it did not fail),
``failed`` (with ``error`` and ``error_type``) or ``terminated`` (SIGTERM); a job directory
without one is ``unknown``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from resnet_cifar.atomic import write_json

STATUS_FILE = "status.json"
COMPLETED = "completed"
PRUNED = "pruned"  # stopped by the search's pruner: its results so far are kept, like a completed job's
FAILED = "failed"
RUNNING = "running"  # written when a job starts: a job that still says so is running, or was killed
UNKNOWN = "unknown"  # no status.json: killed before it could write one (or written by an older version)
NOT_ENDED = (RUNNING, UNKNOWN)
ENDED_WELL = (COMPLETED, PRUNED)  # every other ended status is a failure of the job


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _is_rank_zero() -> bool:
    """Lightning's rank once it is imported; before that (a config error), no other rank exists
    yet unless a launcher set a rank (torchrun, SLURM tasks, Lightning's DDP subprocesses)."""
    rank_zero = sys.modules.get("lightning_fabric.utilities.rank_zero")
    if rank_zero is not None:
        return getattr(rank_zero.rank_zero_only, "rank", 0) == 0
    return all(int(os.environ.get(k) or 0) == 0 for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK"))


def write_status(
    status: str, error: BaseException | None = None, message: str | None = None, extra: dict[str, Any] | None = None
) -> Path | None:
    """Write this Hydra job's ``status.json`` (rank zero only); ``None`` outside Hydra.

    ``extra``: more fields, e.g. ``resumed_from`` (the checkpoint a continued sweep job resumed from).
    """
    if not HydraConfig.initialized() or not _is_rank_zero():
        return None
    hc = HydraConfig.get()
    data: dict[str, Any] = {"status": status, "overrides": list(hc.overrides.task)}
    if hc.mode == RunMode.MULTIRUN:
        data["job"] = hc.job.num
    data.update(extra or {})
    if error is not None:
        data["error_type"] = type(error).__name__
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        data["error"] = message or first_line
    path = Path(hc.runtime.output_dir) / STATUS_FILE
    write_json(path, data)
    return path


def mark_failed(job_dir: str | os.PathLike, error_type: str, error: str) -> bool:
    """Record, from outside the job, that a job which still says ``running`` has failed (it was killed).

    The job's overrides and other fields are kept. Returns whether the file was rewritten.
    """
    path = Path(job_dir) / STATUS_FILE
    status = read_json(path)
    if not status or status.get("status") != RUNNING:
        return False
    write_json(path, {**status, "status": FAILED, "error_type": error_type, "error": error})
    return True


def failed_objective() -> float:
    """What a failed job returns to the sweeper: the worst value for its direction.

    Optuna rejects NaN, so a failed trial is told ``-inf`` when maximising (``+inf`` when
    minimising): the search goes on and never picks it.
    """
    direction = OmegaConf.select(HydraConfig.get(), "sweeper.direction", default="maximize")
    return math.inf if "min" in str(direction).lower() else -math.inf


def job_dirs(sweep_dir: Path) -> list[Path]:
    marks = (".hydra", STATUS_FILE, "metrics.json")
    dirs = [d for d in sweep_dir.iterdir() if d.is_dir() and any((d / m).exists() for m in marks)]
    return sorted(dirs, key=lambda d: (0, int(d.name)) if d.name.isdigit() else (1, d.name))


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def load_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per job directory, in job order: ``job``, ``dir``, ``status`` (of its ``status.json``,
    else ``unknown``), ``error``/``error_type`` when it failed, ``pruned`` (why) when it was pruned,
    ``overrides`` (key -> value) and ``metrics`` (the numbers of its ``metrics.json``)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    runs = []
    for d in job_dirs(sweep_dir):
        status = read_json(d / STATUS_FILE) or {}
        overrides = {}
        for item in recorded_overrides(d) or []:
            key, _, value = str(item).partition("=")
            overrides[key.lstrip("+~")] = _parse_value(value)
        row = {"job": d.name, "dir": str(d), "status": status.get("status", UNKNOWN), "overrides": overrides}
        row.update({k: status[k] for k in ("error", "error_type", "pruned", "resumed_from") if k in status})
        runs.append({**row, "metrics": read_metrics(d)})
    return runs


def recorded_overrides(job_dir: Path) -> list[str] | None:
    """The overrides a job ran with: its ``.hydra/overrides.yaml``, else its ``status.json``'s; None if neither."""
    ov_file = job_dir / ".hydra" / "overrides.yaml"
    if ov_file.is_file():
        return [str(o) for o in yaml.safe_load(ov_file.read_text()) or []]
    status = read_json(job_dir / STATUS_FILE)
    return [str(o) for o in status["overrides"]] if status and "overrides" in status else None


def read_metrics(job_dir: Path) -> dict[str, float]:
    """The numbers of a job's ``metrics.json`` (empty without one)."""
    raw = read_json(job_dir / "metrics.json") or {}
    return {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def status_line(runs: list[dict[str, Any]], total: int | None = None, unknown: str = "running") -> str:
    """One line of progress: ``sweep: 3/5 done, 1 failed, 1 pruned, 1 running``.

    ``done`` counts the jobs that ended (completed or not), ``failed`` those of them that did not
    complete and were not pruned, ``unknown`` names the jobs that have not ended (``running``, or
    no ``status.json`` yet).
    """
    ended = [r for r in runs if r["status"] not in NOT_ENDED]
    failed = sum(r["status"] not in ENDED_WELL for r in ended)
    pruned = sum(r["status"] == PRUNED for r in ended)
    line = f"sweep: {len(ended)}{f'/{total}' if total else ''} done, {failed} failed"
    line += f", {pruned} pruned" if pruned else ""
    pending = len(runs) - len(ended)
    return line + (f", {pending} {unknown}" if pending else "")


def varying_keys(runs: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between jobs (all keys when there is one job)."""
    keys = sorted({k for r in runs for k in r["overrides"]})
    if len(runs) < 2:
        return keys
    # a key set to one value in every job that has it is not swept (e.g. data.root, absent in a crashed job)
    return [
        k for k in keys if len({json.dumps(r["overrides"][k], default=str) for r in runs if k in r["overrides"]}) > 1
    ]
