"""Sweeps that survive failures: a status file per job and a status summary per multirun.

Every job of a Hydra run or multirun leaves ``status.json`` in its directory (rank zero
only): ``{"status": "completed"}`` or ``{"status": "failed", "error": ..., "error_type": ...}``,
with the job's overrides. In a multirun a failing job is recorded and returns
:func:`failed_objective` instead of raising, so the other jobs (and an Optuna search) go
on. At the end, :class:`SweepStatus` writes ``sweep_status.json`` in the sweep directory
(one row per job: status, error, ``val/acc_best`` and ``test/acc`` from ``metrics.json``),
logs a table, and exits with status 1 if any job failed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
SUMMARY_FILE = "sweep_status.json"
EXIT_JOBS_FAILED = 1


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _is_rank_zero() -> bool:
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def write_status(status: str, error: BaseException | None = None, message: str | None = None) -> Path | None:
    """Write this Hydra job's ``status.json`` (rank zero only); ``None`` outside Hydra."""
    if not HydraConfig.initialized() or not _is_rank_zero():
        return None
    hc = HydraConfig.get()
    data: dict[str, Any] = {"status": status, "overrides": list(hc.overrides.task)}
    if hc.mode == RunMode.MULTIRUN:
        data["job"] = hc.job.num
    if error is not None:
        data["error_type"] = type(error).__name__
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        data["error"] = message or first_line
    path = Path(hc.runtime.output_dir) / STATUS_FILE
    _write_json(path, data)
    return path


def failed_objective() -> float:
    """What a failed job returns to the sweeper: the worst value for its direction.

    Optuna rejects NaN (hydra-optuna-sweeper then aborts the search), so a failed trial is told
    ``-inf`` when maximising (``+inf`` when minimising): the search goes on and never picks it.
    """
    direction = OmegaConf.select(HydraConfig.get(), "sweeper.direction", default="maximize")
    return math.inf if "min" in str(direction).lower() else -math.inf


def summarize(sweep_dir: str | Path) -> dict[str, Any]:
    """Collect ``status.json`` and ``metrics.json`` of every job directory under ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    jobs = []
    job_dirs = [d for d in sweep_dir.iterdir() if (d / ".hydra").is_dir() or (d / STATUS_FILE).is_file()]
    for d in sorted(job_dirs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)):
        row: dict[str, Any] = {"dir": d.name, "status": "unknown"}  # unknown: killed before it could write
        if (d / STATUS_FILE).exists():
            row.update(json.loads((d / STATUS_FILE).read_text()))
        if (d / "metrics.json").exists():
            metrics = json.loads((d / "metrics.json").read_text())
            row.update({k: metrics[k] for k in ("val/acc_best", "test/acc") if k in metrics})
        jobs.append(row)
    failed = [j for j in jobs if j["status"] != "completed"]
    return {"jobs": jobs, "n_jobs": len(jobs), "n_failed": len(failed), "failed": [j["dir"] for j in failed]}


def _table(summary: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, (int, float)) else "-"

    common = set.intersection(*(set(j.get("overrides", [])) for j in summary["jobs"])) if summary["jobs"] else set()
    lines = [f"{'job':>4}  {'status':<9}  {'val/acc_best':>12}  {'test/acc':>8}  overrides (those that vary) / error"]
    for j in summary["jobs"]:
        extra = " ".join(o for o in j.get("overrides", []) if o not in common)
        if j["status"] != "completed":
            extra += f"  [{j.get('error_type', '')}: {j.get('error', 'no status.json')}]"
        val, test = fmt(j.get("val/acc_best")), fmt(j.get("test/acc"))
        lines.append(f"{j['dir']:>4}  {j['status']:<9}  {val:>12}  {test:>8}  {extra}")
    return "\n".join(lines)


class SweepStatus(Callback):
    """Hydra callback: at the end of a multirun, write ``sweep_status.json`` and report failed jobs.

    Args:
        fail_on_error: exit with status 1 after the sweep when any job failed (the finished
            jobs' results are all kept), so scripts and CI notice.
    """

    def __init__(self, fail_on_error: bool = True) -> None:
        self.fail_on_error = fail_on_error

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        summary = summarize(sweep_dir)
        _write_json(sweep_dir / SUMMARY_FILE, summary)
        log.info("Sweep %s: %d jobs, %d failed\n%s", sweep_dir, summary["n_jobs"], summary["n_failed"], _table(summary))
        if summary["n_failed"] and self.fail_on_error:
            message = (
                f"{summary['n_failed']} of {summary['n_jobs']} jobs failed (jobs {', '.join(summary['failed'])}); "
                f"the others' results are kept; see {sweep_dir / SUMMARY_FILE}"
            )
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(EXIT_JOBS_FAILED)
