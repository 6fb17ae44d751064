"""The sweep's report when a multirun ends (a Hydra callback), or by hand for any sweep directory."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from resnet_cifar.progress import show_progress
from resnet_cifar.sweeps.resume import EXIT_CONFLICT, is_search, planned_jobs, resume_conflict
from resnet_cifar.sweeps.status import COMPLETED, in_multirun, load_runs, status_line
from resnet_cifar.sweeps.summary import DEFAULT_METRIC, SUMMARY_FILE, summarize

log = logging.getLogger(__name__)

EXIT_JOBS_FAILED = 1


class SweepReport(Callback):
    """Hydra callback: :func:`~resnet_cifar.sweeps.summary.summarize` the sweep when a multirun ends,
    and report failed jobs.

    Args:
        metric: sort and plot by this metric; None: the run's ``optimized_metric``.
        mode: ``max`` or ``min``.
        fail_on_error: exit with status 1 after the sweep when any job failed (neither completed
            nor pruned; the other jobs' results are all kept), so scripts and CI notice.
    """

    def __init__(self, metric: str | None = None, mode: str = "max", fail_on_error: bool = True) -> None:
        self.metric, self.mode, self.fail_on_error = metric, mode, fail_on_error
        self.total: int | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Before the sweeper writes anything: stop (exit 2) if ``hydra.sweep.dir`` holds another sweep."""
        conflict = resume_conflict(config)
        if conflict:
            print(f"error: {conflict}", file=sys.stderr, flush=True)
            sys.exit(EXIT_CONFLICT)
        self.total = planned_jobs(config)
        sweep_dir = OmegaConf.select(config, "hydra.sweep.dir", default=None)
        earlier = load_runs(sweep_dir) if sweep_dir is not None and Path(str(sweep_dir)).is_dir() else []
        if earlier and not is_search(config):  # a search says itself where its study stands
            done = sum(r["status"] == COMPLETED for r in earlier)
            log.info(
                "Continuing the sweep in %s: %d of its jobs completed earlier and are skipped; %d run again, "
                "from their last.ckpt where they have one",
                sweep_dir, done, len(earlier) - done,
            )  # fmt: skip

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """After each job of a multirun, one status line on stderr (when progress is shown)."""
        if not in_multirun() or not show_progress():
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if sweep_dir.is_dir():
            print(status_line(load_runs(sweep_dir), self.total), file=sys.stderr, flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        summary = summarize(sweep_dir, self.metric or config.get("optimized_metric") or DEFAULT_METRIC, self.mode)
        log.info("\n%s", (sweep_dir / "summary.md").read_text())
        counts = f"{summary['n_jobs']} jobs, {summary['n_failed']} failed"
        counts += f", {summary['n_pruned']} pruned" if summary["n_pruned"] else ""
        print(f"Sweep report: {sweep_dir / 'summary.md'} ({counts})")
        if summary["n_failed"] and self.fail_on_error:
            message = (
                f"{summary['n_failed']} of {summary['n_jobs']} jobs failed (jobs {', '.join(summary['failed'])}); "
                f"the others' results are kept; see {sweep_dir / SUMMARY_FILE}"
            )
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(EXIT_JOBS_FAILED)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Summarise a Hydra multirun: a table and a plot of its jobs.")
    parser.add_argument("sweep_dir", help="the multirun directory (holds one subdirectory per job)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help="sort and plot by this metric (default %(default)s)")
    parser.add_argument("--mode", choices=("max", "min"), default="max")
    args = parser.parse_args(argv)
    try:
        summary = summarize(args.sweep_dir, args.metric, args.mode)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if show_progress():  # where a sweep that is still running stands
        saved, total = Path(args.sweep_dir, "multirun.yaml"), None
        if saved.is_file():
            from hydra import initialize_config_dir

            from resnet_cifar import CONFIG_DIR

            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):  # to expand a glob(...)
                total = planned_jobs(OmegaConf.load(saved))
        print(status_line(summary["jobs"], total, unknown="running or killed"), file=sys.stderr)
    print(Path(args.sweep_dir, "summary.md").read_text())
    return 0
