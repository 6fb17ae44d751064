"""The GPU check: one command that measures this project on a GPU and writes one results file.

Made to spend a short GPU window measuring, not debugging, and to come back with results whatever
happens: every command runs guarded on its own (a failure is recorded with its error and the last 15
lines of its stderr, and the next command runs), the results files are rewritten after every command
and every throughput arm (a check killed midway returns what it measured), each throughput arm stops
at its step's deadline, and the long accuracy run comes last, sized from the time left. ``--smoke``
runs the same code end to end on the CPU in a couple of minutes (a test keeps it working, with a
failure injected through ``--fail``). In order:

a. the machine: GPU, torch / Lightning versions, what ``trainer.precision=auto`` resolves to;
b. throughput, steady state: train.py against a bare loop (``bench/train_speed.py``) for ResNet-20
   (batch 128, cudnn.benchmark off: train.py's default) and the CIFAR-stem ResNet-18 (batch 512,
   cudnn.benchmark on, as ``experiment=gpu_3min``'s ``trainer=gpu``), at bf16-mixed and 16-mixed (on a
   CPU bf16-mixed only: Lightning runs 16-mixed as bf16 there), eager and compiled; ``data.on_device``
   true against false; the host syncs per training step, counted with ``torch.cuda.set_sync_debug_mode``
   (target: 0). Each row records the precision and cudnn.benchmark it ran with;
c. ``python train.py experiment=gpu_3min``, the whole command timed;
d. ``eval.py``, ``predict.py`` and ``export.py`` on its ``last.ckpt``, and a 1-GPU ``trainer=ddp`` run;
e. ``experiment=resnet20_he2016`` in the epochs that fit in what is left less a reserve: the paper's
   schedule compressed (its LR steps are fractions of ``trainer.max_epochs``), not its first epochs;
   ``trainer.max_time`` stops it if the estimate was short.

    source .gpu/env.sh && python bench/gpu_check.py $OUT            # on the GPU machine (~8 minutes)
    RESNET_CIFAR_DATA=<synthetic or real root> python bench/gpu_check.py /tmp/gc --smoke   # on a CPU

Writes ``<out>/gpu_check.md`` (the tables) and ``<out>/gpu_check.json`` (every number; ``order``: what
ran when), rewritten after each command; the runs themselves go to ``--work`` (default: a temporary
folder), not to ``<out>``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from _common import DATA_ROOT, compose
from train_speed import ArmStopped, bare_loop, train_py

from resnet_cifar.atomic import atomic_write, write_json
from resnet_cifar.data.cifar10 import TEST_FILES, read_split
from resnet_cifar.training.precision import resolve_precision

REPO = Path(__file__).resolve().parents[1]
HE2016_EPOCHS = 182
RESERVE_S = 30.0  # left at the end of the budget: the last results, and a margin for estimates that were off
TRAIN_OVERHEAD_S = 40.0  # train.py around its training: start-up, the last validation, the test and the report
COMPILE_S = 60.0  # a compiled arm's first step (the compilation) cannot be stopped: not started with less left
STDERR_LINES = 15
INJECTED_FAILURE = "gpu_check_injected_failure=1"  # --fail NAME: an override no config has, which Hydra refuses


class SyncCounter(pl.Callback):
    """Host syncs per training step over ``steps`` steps from ``start``: ``torch.cuda.set_sync_debug_mode``
    warns at every synchronising CUDA call; the warnings are counted with the Python line that made them.
    The window runs from one batch start to a later one, so Lightning's loop and every hook are in it."""

    last: SyncCounter | None = None

    def __init__(self, start: int, steps: int) -> None:
        self.start, self.steps = start, steps
        self.syncs: Counter[str] = Counter()
        self._catch: Any = None
        self._records: list[warnings.WarningMessage] = []
        SyncCounter.last = self

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if not torch.cuda.is_available():
            return
        if idx == self.start:
            self._catch = warnings.catch_warnings(record=True)
            self._records = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif idx == self.start + self.steps and self._catch is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._catch.__exit__(None, None, None)
            self._catch = None
            for w in self._records:
                if "synchroniz" in str(w.message):
                    self.syncs[f"{Path(w.filename).name}:{w.lineno}"] += 1

    def per_step(self) -> float:
        return sum(self.syncs.values()) / self.steps


class RanWith(pl.Callback):
    """What a train.py arm ran with, read from the Trainer: its precision (Lightning's, after any change it
    made: on a CPU it runs ``16-mixed`` as ``bf16-mixed``) and cudnn.benchmark."""

    last: RanWith | None = None

    def __init__(self) -> None:
        self.precision, self.benchmark = "", False
        RanWith.last = self

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.precision, self.benchmark = str(trainer.precision), torch.backends.cudnn.benchmark


class CommandFailed(RuntimeError):
    """A command exited non-zero or timed out; ``result`` holds its command, error and stderr's last lines."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(result["error"])
        self.result = result


def _tail(text: str | bytes | None) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "").strip().splitlines()[-STDERR_LINES:]


def _said(tail: list[str]) -> str:
    """The line of a failed command's stderr that says why: our one-line ``error:``, a traceback's last
    line, or the first line of another message (Hydra's)."""
    lines = [line for line in tail if line.strip() and not line.startswith("Set the environment variable HYDRA")]
    if not lines:
        return "no output on stderr"
    said = next((line for line in reversed(lines) if line.startswith("error")), None)
    exception = re.match(r"[\w.]+(Error|Exception|Interrupt|Exit)\b", lines[-1])
    return said or (lines[-1] if exception else lines[0])


class Check:
    """The results: one entry per step, one per command in it; ``gpu_check.{json,md}`` rewritten after each."""

    def __init__(self, out: Path, smoke: bool, budget_s: float, work: Path, fail: set[str] | None = None) -> None:
        self.out, self.smoke, self.budget_s, self.work = out, smoke, budget_s, work
        self.fail = fail or set()  # commands to make fail (--fail: tests)
        self.start = time.monotonic()
        self.results: dict[str, Any] = {"smoke": smoke, "budget_s": budget_s, "order": [], "steps": {}}
        self._entry: dict[str, Any] = {}
        out.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def _started(self, name: str) -> None:
        print(f"\n=== {name} (at {self.elapsed():.0f} s)", flush=True)
        self.results["order"].append([name, round(self.elapsed(), 1)])

    def step(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run a step guarded; its commands (:meth:`command`) and arms are written into its entry as they end."""
        t = time.monotonic()
        self._started(name)
        entry = self.results["steps"][name] = self._entry = {"ok": None}  # None: running (if killed now)
        self.write()
        try:
            entry.update(fn())
            failed = [k for k, v in entry.items() if isinstance(v, dict) and v.get("ok") is False]
            entry["ok"] = not failed
            if failed:
                entry["failed"] = failed
        except Exception as e:  # noqa: BLE001 - every step is guarded: report it, go on
            tail = traceback.format_exc().strip().splitlines()[-STDERR_LINES:]
            entry.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=tail)
            print("\n".join(tail), flush=True)
        entry["seconds"] = round(time.monotonic() - t, 1)
        self.write()
        return entry

    def command(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """One command of the current step, guarded on its own: its result, or its error and stderr's tail."""
        t = time.monotonic()
        self._started(f"{name}")
        try:
            result = {"ok": True, **fn()}
        except CommandFailed as e:
            result = {"ok": False, **e.result}
        except Exception as e:  # noqa: BLE001 - one command failing must not stop the others
            tb = traceback.format_exc().strip().splitlines()[-STDERR_LINES:]
            result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": tb}
        if not result["ok"]:
            print(
                f"{name} failed: {result['error']}", *result.get("stderr_tail", result.get("traceback", [])), sep="\n"
            )
        result.setdefault("seconds", round(time.monotonic() - t, 1))
        self._entry[name] = result
        self.write()
        return result

    def skip(self, name: str, why: str) -> None:
        self._entry[name] = {"skipped": why}
        self.write()

    def write(self) -> None:
        self.results["total_seconds"] = round(self.elapsed(), 1)
        write_json(self.out / "gpu_check.json", self.results, "GPU check results")
        with atomic_write(self.out / "gpu_check.md", "w", "GPU check report") as f:
            f.write(markdown(self.results))


# ----------------------------------------------------------------------------------- the steps
def machine_step(device: str) -> dict[str, Any]:
    import torchvision

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": pl.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    info["auto_precision"], info["auto_reason"] = resolve_precision("auto", device)
    return info


R20 = "ResNet-20, batch 128, cudnn.benchmark off"  # train.py's defaults (trainer=default sets no benchmark)


def throughput_arms(smoke: bool, accelerator: str) -> list[dict[str, Any]]:
    """The arms of step b, in order of priority (what matters most runs first), each labelled with what runs.

    cudnn.benchmark is set in every arm: Lightning keeps the process's setting when ``trainer.benchmark`` is
    unset, so an arm after a ResNet-18 one would otherwise inherit its autotuner. On a CPU only bf16-mixed:
    Lightning runs ``16-mixed`` as bf16 there, so a "16-mixed" row would be mislabelled.
    """
    models = {
        R20: ["model=resnet20", "++trainer.benchmark=false"],
        "ResNet-18 (CIFAR stem), batch 512, cudnn.benchmark on": [
            "model=resnet18",
            "model.cifar_stem=true",
            "data.batch_size=512",
            "++trainer.benchmark=true",  # as trainer=gpu, which experiment=gpu_3min uses
        ],
    }
    if smoke:
        models = {"ResNet-20, batch 16": ["model=resnet20", "data.batch_size=16", "++trainer.benchmark=false"]}
    precisions = ("bf16-mixed", "16-mixed") if accelerator == "gpu" else ("bf16-mixed",)
    arms = []
    for compiled in (False, True):
        for precision in precisions:
            for model, overrides in models.items():
                tag = f"{model}, {precision}{', compiled' if compiled else ''}"
                cfg = [
                    f"trainer.accelerator={accelerator}",
                    *overrides,
                    f"trainer.precision={precision}",
                    f"module.compile={str(compiled).lower()}",
                ]
                variants = [("", [])]
                if not compiled and precision == "bf16-mixed" and model in (R20, "ResNet-20, batch 16"):
                    variants.append((", data.on_device=false", ["data.on_device=false"]))
                for suffix, more in variants:
                    for kind in ("bare loop", "train.py") if not suffix else ("train.py",):
                        arms.append(
                            {
                                "arm": f"{tag}{suffix}: {kind}",
                                "group": tag + (", host" if suffix else ""),
                                "kind": kind,
                                "model": model,
                                "precision": precision,
                                "compiled": compiled,
                                "overrides": [*cfg, *more],
                            }
                        )
    return arms


def throughput_step(check: Check, accelerator: str, budget_s: float, warmup: int, steps: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    check._entry.update(rows=rows, skipped_for_time=skipped)  # written as the arms end
    deadline = time.monotonic() + budget_s
    counted_syncs = False
    for arm in throughput_arms(check.smoke, accelerator):
        label, kind = arm["arm"], arm["kind"]
        # Each arm stops at the deadline; a compiled one is not started without time for its compilation.
        if deadline - time.monotonic() <= (COMPILE_S if arm["compiled"] and not check.smoke else 0):
            skipped.append(label)
            continue
        row = {k: arm[k] for k in ("arm", "group", "kind", "precision", "compiled")}
        try:
            cfg = compose([f"data.root={DATA_ROOT}", *check_overrides(check.smoke), *arm["overrides"]])
            if kind == "bare loop":
                r = bare_loop(cfg, warmup, steps, deadline=deadline)
                # what bare_loop runs: the config's precision as given (no Lightning to change it)
                row["ran_in"] = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)[0]
                row["cudnn_benchmark"] = torch.backends.cudnn.benchmark
            else:
                extra: dict[str, Any] = {"ran_with": {"_target_": f"{__name__}.RanWith"}}
                if not counted_syncs:  # the host syncs of train.py's step, once
                    extra["sync_counter"] = {"_target_": f"{__name__}.SyncCounter", "start": warmup, "steps": 10}
                r = train_py(cfg, warmup, steps, callbacks=extra, deadline=deadline)
                row["ran_in"], row["cudnn_benchmark"] = RanWith.last.precision, RanWith.last.benchmark
                if not counted_syncs and SyncCounter.last is not None and torch.cuda.is_available():
                    row["syncs_per_step"] = SyncCounter.last.per_step()
                    row["sync_sites"] = dict(SyncCounter.last.syncs.most_common(8))
                counted_syncs = True
            row.update({k: round(v, 2) for k, v in r.items()})
        except ArmStopped as e:
            row["stopped"] = str(e)
        except Exception as e:  # noqa: BLE001 - one arm failing must not end the step
            row["error"] = f"{type(e).__name__}: {e}"
            print(traceback.format_exc()[-1500:], flush=True)
        rows.append(row)
        print(row, flush=True)
        check.write()
    return {"warmup": warmup, "steps": steps}


def check_overrides(smoke: bool) -> list[str]:
    """Overrides every command of the check gets: on the CPU (``--smoke``), tiny runs of the synthetic data."""
    if not smoke:
        return []
    return ["data.strict_sizes=false", "data.val_size=100", "data.eval_batch_size=50"]


def run_command(check: Check, script: str, overrides: list[str], name: str, timeout: float) -> dict[str, Any]:
    """``python <script> <overrides>`` as a user runs it, timed whole; its metrics.json if it wrote one.

    Raises :class:`CommandFailed` (with the last lines of its stderr) on a non-zero exit or a timeout.
    """
    run_dir = check.work / name
    if name in check.fail:  # --fail: a real failure of the real command
        overrides = [*overrides, INJECTED_FAILURE]
    cmd = [sys.executable, str(REPO / script), *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    print("$", " ".join(cmd[1:]), flush=True)
    result: dict[str, Any] = {"command": " ".join(["python", script, *overrides]), "run_dir": str(run_dir)}
    t = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(timeout, 30))
    except subprocess.TimeoutExpired as e:
        result.update(wall_clock_s=round(time.monotonic() - t, 1), stderr_tail=_tail(e.stderr))
        raise CommandFailed({**result, "error": f"{script} killed after its timeout of {e.timeout:.0f} s"}) from None
    result.update(wall_clock_s=round(time.monotonic() - t, 1), returncode=proc.returncode)
    if proc.returncode != 0:
        tail = _tail(proc.stderr)
        raise CommandFailed(
            {**result, "stderr_tail": tail, "error": f"{script} exited with {proc.returncode}: {_said(tail)}"}
        )
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        keys = ("val/acc_best", "val/acc", "test/acc", "test/loss", "epochs", "precision", "best_ckpt")
        result["metrics"] = {k: metrics[k] for k in keys if k in metrics}
    return result


def smoke_training(check: Check) -> list[str]:
    """--smoke: training runs of 3 batches of 16 images, one validation batch."""
    if not check.smoke:
        return []
    return ["data.batch_size=16", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1"]


def gpu_3min_step(check: Check, accelerator: str) -> dict[str, Any]:
    overrides = ["experiment=gpu_3min", f"trainer.accelerator={accelerator}", *check_overrides(check.smoke)]
    overrides += smoke_training(check) + (["trainer.max_time=00:00:00:20"] if check.smoke else [])
    check.command("gpu_3min", lambda: run_command(check, "train.py", overrides, "gpu_3min", 400))
    return {}


def tools_step(check: Check, accelerator: str) -> dict[str, Any]:
    """eval / predict / export on gpu_3min's last.ckpt (each on its own), and one short DDP run on one GPU."""
    ckpt = check.work / "gpu_3min" / "checkpoints" / "last.ckpt"
    device = "gpu" if accelerator == "gpu" else "cpu"  # Lightning's spelling, which predict must accept
    if not ckpt.is_file():
        for name in ("eval", "predict", "export"):
            check.skip(name, f"no {ckpt.name} from step c")
    else:
        # the data settings are the checkpoint's: eval.py takes only the data root (RESNET_CIFAR_DATA) from here
        ev = [f"ckpt_path={ckpt}", f"trainer.accelerator={accelerator}"]
        check.command("eval", lambda: run_command(check, "eval.py", ev, "eval", 120))
        check.command("predict", lambda: predict_command(check, ckpt, device))
        ex = [f"ckpt_path={ckpt}", "formats=[torch_export,safetensors]", "check_images=200"]
        ex.append(f"output_dir={check.work / 'export'}")
        check.command("export", lambda: run_command(check, "export.py", ex, "export", 120))
    ddp = ["trainer=ddp", "trainer.devices=1", "trainer.max_epochs=1", "trainer.limit_train_batches=50"]
    ddp.append("module.compile=false")  # the DDP path, within its time limit (step b times compiling)
    ddp += check_overrides(check.smoke)
    if accelerator == "cpu":  # --smoke: the same strategy on the CPU
        ddp += ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.strategy.process_group_backend=gloo"]
        ddp += smoke_training(check)
    ddp.append("trainer.limit_test_batches=5")
    check.command("ddp_1gpu", lambda: run_command(check, "train.py", ddp, "ddp", 120))
    return {}


def predict_command(check: Check, ckpt: Path, device: str) -> dict[str, Any]:
    from PIL import Image

    images = check.work / "predict_images"
    images.mkdir(exist_ok=True)
    test = read_split(Path(DATA_ROOT) / "cifar-10-batches-py", TEST_FILES)
    for i in range(16):
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(
            images / f"test_{i:02d}_label{test.labels[i]}.png"
        )
    pred = check.work / "predictions.json"
    overrides = [f"ckpt_path={ckpt}", f"inputs={images}", f"device={device}", f"output={pred}"]
    result = run_command(check, "predict.py", overrides, "predict", 60)
    predictions = json.loads(pred.read_text())
    result["predicted"] = len(predictions.get("predictions", predictions))
    return result


def he2016_plan(left_s: float, images_per_s: float | None) -> tuple[int, float] | None:
    """``(epochs, seconds of training)`` of resnet20_he2016 in ``left_s`` less the reserve and train.py's
    overhead, at ``images_per_s`` (train.py's ResNet-20 rate of step b; unknown: 10 s per epoch); None: no epoch fits.
    """
    epoch_s = 45_000 / images_per_s * 1.1 if images_per_s else 10.0  # + its validation
    train_s = left_s - RESERVE_S - TRAIN_OVERHEAD_S
    epochs = min(HE2016_EPOCHS, int(train_s / epoch_s))
    return (epochs, train_s) if epochs >= 1 else None


def he2016_step(check: Check, accelerator: str, r20_images_per_s: float | None) -> dict[str, Any]:
    name = "resnet20_he2016"
    plan = (1, 60.0) if check.smoke else he2016_plan(check.left(), r20_images_per_s)  # smoke: 1 epoch of 3 batches
    if plan is None:
        check.skip(name, f"{check.left():.0f} s left: not one epoch besides the {RESERVE_S:.0f} s reserve")
        return {}
    epochs, train_s = plan
    overrides = ["experiment=resnet20_he2016", f"trainer.max_epochs={epochs}", f"trainer.accelerator={accelerator}"]
    overrides += check_overrides(check.smoke) + smoke_training(check)
    if not check.smoke:  # a hard stop if the epochs take longer than estimated
        overrides.append(f"trainer.max_time=00:00:{int(train_s // 60):02d}:{int(train_s % 60):02d}")
    milestones = list(compose(["experiment=resnet20_he2016"]).scheduler.milestones)
    n = f"{epochs} epoch{'s' if epochs > 1 else ''}"
    schedule = (
        f"He et al.'s {HE2016_EPOCHS}-epoch schedule compressed into {n} (LR / 10 at "
        f"{' and '.join(f'{m:.0%}' for m in milestones)} of them), not its first {n}"
    )
    result = check.command(
        name, lambda: run_command(check, "train.py", overrides, name, train_s + TRAIN_OVERHEAD_S + RESERVE_S / 2)
    )
    result.update(planned_epochs=epochs, schedule=schedule)
    check.write()
    return {}


# -------------------------------------------------------------------------------- the report
def markdown(results: dict[str, Any]) -> str:
    steps = results["steps"]
    lines = ["# GPU check" + (" (--smoke, on the CPU: not a measurement)" if results["smoke"] else ""), ""]
    m = steps.get("a. machine", {})
    if m.get("ok"):
        lines.append(
            f"Machine: {m.get('gpu', 'no GPU')} (compute capability {m.get('compute_capability', '-')}, "
            f"{m.get('gpu_memory_gib', '-')} GiB), torch {m['torch']}, torchvision {m['torchvision']}, "
            f"Lightning {m['lightning']}, Python {m['python']}, {m['cpu_count']} CPUs; "
            f"`trainer.precision=auto` resolves to **{m['auto_precision']}** ({m['auto_reason']})."
        )
    for name, step in steps.items():
        state = {None: "running or killed", True: "", False: "failed"}[step.get("ok")]
        lines += ["", f"## {name} ({step.get('seconds', '?')} s{', ' + state if state else ''})", ""]
        if "error" in step:
            lines += [f"**failed**: {step['error']}", "", "```", *step.get("traceback", []), "```"]
        if name.startswith("b."):
            lines += _throughput_table(step)
        elif not name.startswith("a."):
            lines += _commands_table(step)
    lines += ["", f"Total: {results.get('total_seconds')} s of a budget of {results.get('budget_s')} s."]
    return "\n".join(lines) + "\n"


def _commands_table(step: dict[str, Any]) -> list[str]:
    out = [
        "| run | command | wall-clock s | epochs | val acc (best) | test acc | precision |",
        "|---|---|---|---|---|---|---|",
    ]
    failures = []
    for run, r in step.items():
        if not isinstance(r, dict):
            continue
        if "skipped" in r:
            out.append(f"| {run} | skipped: {r['skipped']} | | | | | |")
            continue
        if not r.get("ok"):
            out.append(
                f"| {run} | `{r.get('command', '')}` | {r.get('wall_clock_s', '')} | **failed**: {r['error']} | | | |"
            )
            failures += [
                "",
                f"{run}, the last lines of its stderr:",
                "",
                "```",
                *r.get("stderr_tail", r.get("traceback", [])),
                "```",
            ]
            continue
        mt = r.get("metrics", {})
        epochs = mt.get("epochs", "")
        if "planned_epochs" in r:
            epochs = f"{epochs} of {r['planned_epochs']} planned: {r['schedule']}"
        val, test = mt.get("val/acc_best"), mt.get("test/acc")
        out.append(
            f"| {run} | `{r.get('command', '')}` | {r.get('wall_clock_s', '')} | {epochs} | "
            f"{'' if val is None else f'{100 * val:.2f}%'} | {'' if test is None else f'{100 * test:.2f}%'} | "
            f"{mt.get('precision', '')} |"
        )
    return out + failures


def _throughput_table(step: dict[str, Any]) -> list[str]:
    rows = step.get("rows", [])
    bare = {r["group"]: r["images_per_s"] for r in rows if r.get("kind") == "bare loop" and "images_per_s" in r}
    out = [
        "| arm | images/s | vs bare loop | first step s | ran in | host syncs per step |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r or "stopped" in r:
            out.append(f"| {r['arm']} | {'failed: ' + r['error'] if 'error' in r else r['stopped']} | | | | |")
            continue
        group = r["group"].removesuffix(", host")
        ratio = f"{r['images_per_s'] / bare[group]:.3f}x" if r["kind"] == "train.py" and group in bare else ""
        syncs = r.get("syncs_per_step", "")
        if r.get("sync_sites"):
            syncs = f"{syncs} ({', '.join(f'{k} x{v}' for k, v in r['sync_sites'].items())})"
        ran = f"{r['ran_in']}, cudnn.benchmark {'on' if r['cudnn_benchmark'] else 'off'}"
        out.append(f"| {r['arm']} | {r['images_per_s']:.0f} | {ratio} | {r['first_step_s']} | {ran} | {syncs} |")
    if step.get("skipped_for_time"):
        out += ["", "Not run (the step's time budget was spent): " + "; ".join(step["skipped_for_time"])]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for gpu_check.md and gpu_check.json")
    p.add_argument("--smoke", action="store_true", help="the same steps on the CPU, tiny (seconds per step)")
    p.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check (default 450)")
    p.add_argument("--throughput-budget", type=float, default=150.0, help="seconds for step b (default 150)")
    p.add_argument(
        "--fail",
        action="append",
        default=[],
        metavar="NAME",
        help="make command NAME (gpu_3min, eval, predict, export, ddp_1gpu, resnet20_he2016) fail, with an "
        "override no config has: for tests of the check itself",
    )
    args = p.parse_args()
    accelerator = "cpu" if args.smoke else "gpu"
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU is visible (use --smoke on a CPU)")
    if args.smoke:  # real Dynamo tracing, without inductor's C++ build on a CPU
        torch.compile = functools.partial(torch.compile, backend="eager")
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))).resolve()  # the commands run in the repo
    check = Check(args.out, args.smoke, args.budget, work, set(args.fail))
    warmup, steps = (2, 2) if args.smoke else (15, 60)
    check.step("a. machine", functools.partial(machine_step, accelerator))
    b = check.step("b. throughput", lambda: throughput_step(check, accelerator, args.throughput_budget, warmup, steps))
    r20 = next(
        (
            r["images_per_s"]
            for r in b.get("rows", [])
            if r["kind"] == "train.py" and r["group"] == f"{R20}, bf16-mixed" and "images_per_s" in r
        ),
        None,
    )
    check.step("c. gpu_3min", lambda: gpu_3min_step(check, accelerator))
    check.step("d. eval, predict, export, DDP", lambda: tools_step(check, accelerator))
    check.step("e. resnet20_he2016 (the time left)", lambda: he2016_step(check, accelerator, r20))
    print(f"\ngpu_check: {check.out / 'gpu_check.md'} ({check.elapsed():.0f} s)")


if __name__ == "__main__":
    main()
