"""What an Optuna search found: the best trial as a ready command line, the trials table, Optuna's plots.

Written into the sweep directory when a search ends (by each launch of a shared study, over all
its trials): ``search.md`` (the best trial, its command, the table), ``search_trials.csv``,
``optimization_results.yaml`` (best value, parameters and command, for scripts),
``search_history.png`` and ``search_importance.png`` (Optuna's optimisation history and
parameter importances) and ``search_intermediate.png`` (each trial's reported ``val/acc`` by
step: where the pruned ones stopped).
"""

from __future__ import annotations

import csv
import logging
import math
import shlex
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from resnet_cifar.sweeps.table import fmt, markdown_table

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

METRIC_ATTR = "optimized_metric"  # the study's user attribute naming what its values are
# Overrides of the search itself (and their keys below): not part of a trial's own command.
SEARCH_KEYS = ("hparams_search", "callbacks.trial_pruning")
PLOTS = {"history": "search_history.png", "importance": "search_importance.png",
         "intermediate": "search_intermediate.png"}  # fmt: skip


def program() -> str:
    """How this process was started, as a command to type: ``python train.py``, or ``resnet-cifar-train``."""
    argv0 = sys.argv[0]
    return f"python {argv0}" if argv0.endswith(".py") else Path(argv0).name


def command_line(overrides: list[str], prog: str) -> str:
    """``prog`` with a trial's overrides, the search's own left out: that trial as a single run."""

    def of_the_search(override: str) -> bool:
        key = override.split("=", 1)[0].lstrip("+~")
        return any(key == k or key.startswith(k + ".") for k in SEARCH_KEYS)

    return " ".join([prog, *(shlex.quote(o) for o in overrides if not of_the_search(o))])


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial, in trial order: ``trial``, ``state``, ``value`` (a pruned trial's: its last
    report), ``steps`` (the step of its last report), ``params``, ``duration_s``, ``job_dir``."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = t.duration.total_seconds() if t.duration is not None else None
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                "value": t.value,
                "steps": t.last_step,
                "params": dict(t.params),
                "duration_s": duration,
                "job_dir": t.user_attrs.get("job_dir"),
            }
        )
    return rows


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The completed trial with the best finite value (a failed job's is infinite), else None."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if math.isfinite(t.value)]
    if not done:
        return None
    best = max if study.direction == StudyDirection.MAXIMIZE else min
    return best(done, key=lambda t: t.value)


def _save_plot(name: str, draw: Callable[[], Any], path: Path) -> Path | None:
    """Draw one of Optuna's matplotlib plots into ``path``; a plot that cannot be drawn is a warning."""
    import matplotlib.pyplot as plt

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental API, too few trials for a statistic, ...
            ax = draw()
        fig = ax.figure
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
        return path
    except Exception as e:  # e.g. importances need two completed trials; the tables are written regardless
        log.warning("could not plot the search's %s: %s", name, e)
        plt.close("all")
        return None


def _plots(study: optuna.Study, sweep_dir: Path) -> dict[str, Path]:
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.visualization import matplotlib as vis

    metric = study.user_attrs.get(METRIC_ATTR, "value")
    draw = {
        "history": lambda: vis.plot_optimization_history(study, target_name=metric),  # leaves out a failed job's -inf
        # PED-ANOVA: no scikit-learn needed (fANOVA, the default before Optuna 5, needs it)
        "importance": lambda: vis.plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator()),
        "intermediate": lambda: vis.plot_intermediate_values(study),
    }
    saved = {name: _save_plot(name, draw[name], sweep_dir / file) for name, file in PLOTS.items()}
    return {name: path for name, path in saved.items() if path is not None}


def write_search_report(study: optuna.Study, sweep_dir: str | Path, prog: str | None = None) -> dict[str, Any]:
    """Write what the search found into ``sweep_dir`` (see the module); return ``optimization_results``."""
    sweep_dir = Path(sweep_dir)
    prog = prog or program()
    rows = trial_rows(study)
    names = sorted({k for r in rows for k in r["params"]})
    best = best_trial(study)
    command = command_line(best.user_attrs.get("overrides", []), prog) if best else None
    results: dict[str, Any] = {"name": "optuna", "study_name": study.study_name}
    if best is not None:
        results |= {"best_trial": best.number, "best_value": best.value, "best_params": dict(best.params),
                    "command": command, "job_dir": best.user_attrs.get("job_dir")}  # fmt: skip
    (sweep_dir / "optimization_results.yaml").write_text(yaml.safe_dump(results, sort_keys=False))

    with open(sweep_dir / "search_trials.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "state", "value", "steps", *names, "duration_s", "job_dir"])
        for r in rows:
            w.writerow([r["trial"], r["state"], r["value"], r["steps"], *[r["params"].get(k) for k in names],
                        r["duration_s"], r["job_dir"]])  # fmt: skip
    plots = _plots(study, sweep_dir)

    states = Counter(r["state"] for r in rows)
    lines = [f"# Search: study `{study.study_name}`", "",
             f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + ".", ""]  # fmt: skip
    if best is None:
        lines += ["No trial completed with a finite value.", ""]
    else:
        lines += [
            f"## Best trial: {best.number}, value {fmt(best.value)} ({study.direction.name.lower()})",
            "",
            f"Its run directory: `{best.user_attrs.get('job_dir')}`. The same run alone (its parameters, "
            "without the search; it trains, then tests the best checkpoint):",
            "",
            "```bash",
            command,
            "```",
            "",
        ]
    metric = study.user_attrs.get(METRIC_ATTR, "optimized_metric")
    lines += ["## Trials", "", f"`value`: the job's return value (`{metric}`); a pruned trial's is the last value it "
              "reported; `steps`: the training step of its last report.", ""]  # fmt: skip
    cells = [[str(r["trial"]), r["state"], fmt(r["value"]), fmt(r["steps"]), *[fmt(r["params"].get(k)) for k in names],
              fmt(r["duration_s"])] for r in rows]  # fmt: skip
    lines += markdown_table(["trial", "state", "value", "steps", *names, "duration_s"], cells)
    lines += ["", *[f"![{name}]({path.name})" for name, path in plots.items()]]
    (sweep_dir / "search.md").write_text("\n".join(lines) + "\n")
    log.info("Search report: %s%s", sweep_dir / "search.md", f"; best trial: {command}" if command else "")
    return results
