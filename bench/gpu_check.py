"""The GPU check: one command that measures this project on a GPU and writes one results file.

Made to spend a short GPU window measuring, not debugging: every step runs guarded (a failure is
recorded with its traceback's last lines and the next step runs), the throughput step stops at its
time budget, and ``--smoke`` runs the same code end to end on the CPU in a couple of minutes (a test
keeps it working). In order:

a. the machine: GPU, torch / Lightning versions, what ``trainer.precision=auto`` resolves to;
b. throughput, steady state: train.py against a bare loop (``bench/train_speed.py``) for ResNet-20
   (batch 128, train.py's default) and the CIFAR-stem ResNet-18 (batch 512, ``experiment=gpu_3min``),
   at bf16-mixed and 16-mixed, eager and compiled; ``data.on_device`` true against false; the host
   syncs per training step, counted with ``torch.cuda.set_sync_debug_mode`` (target: 0);
c. accuracy: ``python train.py experiment=gpu_3min`` (the whole command timed), then
   ``experiment=resnet20_he2016`` for as many of its 182 epochs as the time left allows (said so);
d. ``eval.py``, ``predict.py`` and ``export.py`` on the GPU checkpoint of (c), and a 1-GPU ``trainer=ddp`` run.

    source .gpu/env.sh && python bench/gpu_check.py $OUT            # on the GPU machine (~8 minutes)
    RESNET_CIFAR_DATA=<synthetic or real root> python bench/gpu_check.py /tmp/gc --smoke   # on a CPU

Writes ``<out>/gpu_check.md`` (the tables) and ``<out>/gpu_check.json`` (every number), rewritten
after each step so that a run cut short still returns what it measured; the runs themselves go to
``--work`` (default: a temporary folder), not to ``<out>``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
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
from train_speed import bare_loop, train_py

from resnet_cifar.data.cifar10 import TEST_FILES, read_split
from resnet_cifar.training.precision import resolve_precision

REPO = Path(__file__).resolve().parents[1]
HE2016_EPOCHS = 182


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


class Check:
    """The results: one entry per step, written to ``gpu_check.{json,md}`` after each."""

    def __init__(self, out: Path, smoke: bool, budget_s: float) -> None:
        self.out, self.smoke, self.budget_s = out, smoke, budget_s
        self.start = time.monotonic()
        self.results: dict[str, Any] = {"smoke": smoke, "steps": {}}
        out.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def step(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        t = time.monotonic()
        print(f"\n=== {name} (at {self.elapsed():.0f} s)", flush=True)
        try:
            result = {"ok": True, **fn()}
        except Exception as e:  # noqa: BLE001 - every step is guarded: report it, go on
            tail = traceback.format_exc().strip().splitlines()[-12:]
            result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": tail}
            print("\n".join(tail), flush=True)
        result["seconds"] = round(time.monotonic() - t, 1)
        self.results["steps"][name] = result
        self.write()
        return result

    def write(self) -> None:
        self.results["total_seconds"] = round(self.elapsed(), 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "gpu_check.md").write_text(markdown(self.results))


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


def throughput_arms(smoke: bool, accelerator: str) -> list[tuple[str, list[str], str, str]]:
    """``(label, overrides, arm, group)`` in order of priority: what matters most runs first."""
    models = {"ResNet-20, batch 128": ["model=resnet20"]}
    models["ResNet-18 (CIFAR stem), batch 512"] = ["model=resnet18", "model.cifar_stem=true", "data.batch_size=512"]
    if smoke:
        models = {"ResNet-20, batch 16": ["model=resnet20", "data.batch_size=16"]}
    arms = []
    for compiled in (False, True):
        for precision in ("bf16-mixed", "16-mixed"):
            for model, overrides in models.items():
                tag = f"{model}, {precision}{', compiled' if compiled else ''}"
                cfg = [*overrides, f"trainer.precision={precision}", f"module.compile={str(compiled).lower()}"]
                for arm in ("bare loop", "train.py"):
                    arms.append((f"{tag}: {arm}", cfg, arm, tag))
                if not compiled and precision == "bf16-mixed" and model.startswith("ResNet-20"):
                    host = "data.on_device=false"
                    arms.append((f"{tag}, data.on_device=false: train.py", [*cfg, host], "train.py", f"{tag}, host"))
    return [(label, [f"trainer.accelerator={accelerator}", *o], arm, g) for label, o, arm, g in arms]


def throughput_step(check: Check, accelerator: str, budget_s: float, warmup: int, steps: int) -> dict[str, Any]:
    rows, skipped, first = [], [], True
    deadline = time.monotonic() + budget_s
    for label, overrides, arm, group in throughput_arms(check.smoke, accelerator):
        if time.monotonic() > deadline:
            skipped.append(label)
            continue
        cfg = compose([f"data.root={DATA_ROOT}", *check_overrides(check.smoke), *overrides])
        extra = {}
        if arm == "train.py" and first:  # the host syncs of train.py's step, once
            extra = {"sync_counter": {"_target_": f"{__name__}.SyncCounter", "start": warmup, "steps": 10}}
        try:
            r = (bare_loop if arm == "bare loop" else functools.partial(train_py, callbacks=extra))(cfg, warmup, steps)
        except Exception as e:  # noqa: BLE001 - one arm failing must not end the step
            rows.append({"arm": label, "group": group, "error": f"{type(e).__name__}: {e}"})
            print(traceback.format_exc()[-1500:], flush=True)
            continue
        row = {"arm": label, "group": group, "kind": arm, **{k: round(v, 2) for k, v in r.items()}}
        if extra and SyncCounter.last is not None and torch.cuda.is_available():
            row["syncs_per_step"] = SyncCounter.last.per_step()
            row["sync_sites"] = dict(SyncCounter.last.syncs.most_common(8))
        if arm == "train.py":
            first = False
        rows.append(row)
        print(row, flush=True)
        check.results["steps"]["b. throughput"] = {"ok": True, "rows": rows, "partial": True}
        check.write()
    return {"rows": rows, "skipped_for_time": skipped, "warmup": warmup, "steps": steps}


def check_overrides(smoke: bool) -> list[str]:
    """Overrides every command of the check gets: on the CPU (``--smoke``), tiny runs of the synthetic data."""
    if not smoke:
        return []
    return ["data.strict_sizes=false", "data.val_size=100", "data.eval_batch_size=50"]


def run_command(script: str, overrides: list[str], work: Path, name: str, timeout: float) -> dict[str, Any]:
    """``python <script> <overrides>`` as a user runs it, timed whole; its metrics.json if it wrote one."""
    run_dir = work / name
    cmd = [sys.executable, str(REPO / script), *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    print("$", " ".join(cmd[1:]), flush=True)
    t = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(timeout, 30))
    result: dict[str, Any] = {
        "command": " ".join(["python", script, *overrides]),
        "wall_clock_s": round(time.monotonic() - t, 1),
        "returncode": proc.returncode,
        "run_dir": str(run_dir),
    }
    if proc.returncode != 0:
        result["stderr_tail"] = proc.stderr.strip().splitlines()[-15:]
        raise RuntimeError(f"{script} exited with {proc.returncode}: {' | '.join(result['stderr_tail'][-3:])}")
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        keys = ("val/acc_best", "val/acc", "test/acc", "test/loss", "epochs", "precision", "best_ckpt")
        result["metrics"] = {k: metrics[k] for k in keys if k in metrics}
    return result


def accuracy_step(check: Check, work: Path, accelerator: str, r20_images_per_s: float | None) -> dict[str, Any]:
    common = [f"trainer.accelerator={accelerator}", *check_overrides(check.smoke)]
    smoke = (
        ["data.batch_size=16", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1"] if check.smoke else []
    )
    fast = ["trainer.max_time=00:00:00:20", "trainer.limit_test_batches=1"] if check.smoke else []
    out = {"gpu_3min": run_command("train.py", ["experiment=gpu_3min", *common, *smoke, *fast], work, "gpu_3min", 400)}
    # ResNet-20, He et al.: the epochs that fit in what is left (less ~40 s for start-up, test and report)
    epoch_s = 45_000 / r20_images_per_s * 1.1 if r20_images_per_s else 10.0  # + validation
    epochs = max(1, min(HE2016_EPOCHS, int((check.left() - 40) / epoch_s)))
    if check.smoke:
        epochs = 1
    he = ["experiment=resnet20_he2016", f"trainer.max_epochs={epochs}", *common, *smoke]
    if check.left() > 40 + epoch_s or check.smoke:
        out["resnet20_he2016"] = run_command("train.py", he, work, "resnet20_he2016", check.left())
        out["resnet20_he2016"]["epochs_of_182"] = epochs
    else:
        out["resnet20_he2016"] = {"skipped": f"{check.left():.0f} s left, an epoch takes ~{epoch_s:.0f} s"}
    return out


def tools_step(check: Check, work: Path, accelerator: str, ckpt: str | None) -> dict[str, Any]:
    """eval / predict / export on the GPU checkpoint, and one short DDP run on one GPU."""
    if not ckpt:
        raise RuntimeError("no checkpoint from step c")
    out: dict[str, Any] = {}
    common = check_overrides(check.smoke)
    device = "gpu" if accelerator == "gpu" else "cpu"  # Lightning's spelling, which predict must accept
    # the data settings are the checkpoint's: eval.py takes only the data root (RESNET_CIFAR_DATA) from here
    out["eval"] = run_command("eval.py", [f"ckpt_path={ckpt}", f"trainer.accelerator={accelerator}"], work, "eval", 120)
    images = work / "predict_images"
    images.mkdir(exist_ok=True)
    from PIL import Image

    test = read_split(Path(DATA_ROOT) / "cifar-10-batches-py", TEST_FILES)
    for i in range(16):
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(
            images / f"test_{i:02d}_label{test.labels[i]}.png"
        )
    pred = work / "predictions.json"
    out["predict"] = run_command(
        "predict.py",
        [f"ckpt_path={ckpt}", f"inputs={images}", f"device={device}", f"output={pred}"],
        work,
        "predict",
        60,
    )
    predictions = json.loads(pred.read_text())
    out["predict"]["predicted"] = len(predictions.get("predictions", predictions))
    out["export"] = run_command(
        "export.py",
        [
            f"ckpt_path={ckpt}",
            "formats=[torch_export,safetensors]",
            "check_images=200",
            f"output_dir={work / 'export'}",
        ],
        work,
        "export",
        120,
    )
    ddp = ["trainer=ddp", "trainer.devices=1", "trainer.max_epochs=1", "trainer.limit_train_batches=50", *common]
    if accelerator == "cpu":  # --smoke: the same strategy on the CPU
        ddp += ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.strategy.process_group_backend=gloo"]
        ddp += ["trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "data.batch_size=16"]
    out["ddp_1gpu"] = run_command("train.py", [*ddp, "trainer.limit_test_batches=5"], work, "ddp", 120)
    return out


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
        lines += ["", f"## {name} ({step.get('seconds', '?')} s)", ""]
        if not step.get("ok"):
            lines += [f"**failed**: {step.get('error')}", "", "```", *step.get("traceback", []), "```"]
            continue
        if name.startswith("b."):
            lines += _throughput_table(step)
        elif name.startswith(("c.", "d.")):
            lines += [
                "| run | command | wall-clock s | epochs | val acc (best) | test acc |",
                "|---|---|---|---|---|---|",
            ]
            for run, r in step.items():
                if not isinstance(r, dict):
                    continue
                if "skipped" in r:
                    lines.append(f"| {run} | skipped: {r['skipped']} | | | | |")
                    continue
                mt = r.get("metrics", {})
                epochs = mt.get("epochs", "")
                if "epochs_of_182" in r:
                    epochs = f"{epochs} (of 182: the time left)"
                val, test = mt.get("val/acc_best"), mt.get("test/acc")
                lines.append(
                    f"| {run} | `{r.get('command', '')}` | {r.get('wall_clock_s', '')} | {epochs} | "
                    f"{'' if val is None else f'{100 * val:.2f}%'} | {'' if test is None else f'{100 * test:.2f}%'} |"
                )
    lines += ["", f"Total: {results.get('total_seconds')} s."]
    return "\n".join(lines) + "\n"


def _throughput_table(step: dict[str, Any]) -> list[str]:
    rows = step.get("rows", [])
    bare = {r["group"]: r["images_per_s"] for r in rows if r.get("kind") == "bare loop" and "images_per_s" in r}
    out = [
        "| arm | images/s | vs bare loop | first step s | host syncs per step |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['arm']} | failed: {r['error']} | | | |")
            continue
        group = r["group"].removesuffix(", host")
        ratio = f"{r['images_per_s'] / bare[group]:.3f}x" if r["kind"] == "train.py" and group in bare else ""
        syncs = r.get("syncs_per_step", "")
        if r.get("sync_sites"):
            syncs = f"{syncs} ({', '.join(f'{k} x{v}' for k, v in r['sync_sites'].items())})"
        out.append(f"| {r['arm']} | {r['images_per_s']:.0f} | {ratio} | {r['first_step_s']} | {syncs} |")
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
    args = p.parse_args()
    accelerator = "cpu" if args.smoke else "gpu"
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU is visible (use --smoke on a CPU)")
    if args.smoke:  # real Dynamo tracing, without inductor's C++ build on a CPU
        torch.compile = functools.partial(torch.compile, backend="eager")
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    check = Check(args.out, args.smoke, args.budget)
    warmup, steps = (2, 2) if args.smoke else (15, 60)
    check.step("a. machine", functools.partial(machine_step, accelerator))
    b = check.step("b. throughput", lambda: throughput_step(check, accelerator, args.throughput_budget, warmup, steps))
    r20 = next(
        (
            r["images_per_s"]
            for r in b.get("rows", [])
            if r.get("kind") == "train.py" and r["group"] == "ResNet-20, batch 128, bf16-mixed"
        ),
        None,
    )
    c = check.step("c. accuracy", lambda: accuracy_step(check, work, accelerator, r20))
    ckpt = c.get("gpu_3min", {}).get("metrics", {}).get("best_ckpt")
    check.step("d. eval, predict, export, DDP", lambda: tools_step(check, work, accelerator, ckpt))
    print(f"\ngpu_check: {check.out / 'gpu_check.md'} ({check.elapsed():.0f} s)")


if __name__ == "__main__":
    main()
