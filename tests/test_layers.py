"""The package's layers: no module of src/resnet_cifar imports from a layer above its own.

Read from the source with ``ast`` (imports inside functions included), so an upward import fails
here even where it would not make an import cycle yet.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "src" / "resnet_cifar"

# Bottom to top. A module may import from its own layer and the layers below. Its layer is named by
# its first name under resnet_cifar (a subpackage as a whole); "resnet_cifar" is the package's __init__.
LAYERS: tuple[frozenset[str], ...] = (
    # what every layer uses: errors, file writes, progress bars, figures to the trackers, plain dicts
    frozenset({"resnet_cifar", "errors", "atomic", "progress", "trackers", "plain"}),
    frozenset({"data", "models", "stages", "study"}),  # the parts a run is built from (a search's trial too)
    frozenset({"evaluation"}),  # metrics, figures and the report (used by the training module)
    frozenset({"training"}),  # the LightningModule, learning rates, checkpoints
    frozenset({"schema", "config"}),  # the config's checks (names come from the registries below)
    frozenset({"run", "tune", "inference", "export", "sweeps"}),  # the tasks the commands run
    frozenset({"cli"}),  # the console commands
)


def top_level_names() -> set[str]:
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {"resnet_cifar"} | modules | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}


def layer(module: str) -> int:
    """The layer of ``resnet_cifar[.name[...]]``."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "resnet_cifar"
    (index,) = [i for i, names in enumerate(LAYERS) if name in names]
    return index


def imported(path: Path) -> set[str]:
    """The resnet_cifar modules ``path`` imports (``from resnet_cifar import x``: x, if it is a module)."""
    package = ".".join(("resnet_cifar", *path.relative_to(PACKAGE).parent.parts))
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            out.add(base)
            if base == "resnet_cifar":
                out |= {f"resnet_cifar.{a.name}" for a in node.names if a.name in top_level_names()}
    return {m for m in out if m == "resnet_cifar" or m.startswith("resnet_cifar.")}


def test_every_module_has_a_layer():
    placed = [name for names in LAYERS for name in names]
    assert len(placed) == len(set(placed)), "a name in two layers"
    assert set(placed) == top_level_names(), "place a new module of src/resnet_cifar in LAYERS (or remove a gone one)"


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        module = ".".join(("resnet_cifar", *[p for p in parts if p != "__init__"]))
        for target in sorted(imported(path)):
            if layer(target) > layer(module):
                upward.append(f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})")
    assert not upward, upward


def test_the_imports_found_include_those_inside_functions():
    found = imported(PACKAGE / "cli.py")
    assert {"resnet_cifar", "resnet_cifar.errors", "resnet_cifar.run", "resnet_cifar.export"} <= found
