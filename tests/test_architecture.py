"""The import rules of docs/architecture.md: every import inside ``scalerec`` (module level or in a function) goes
to the same or a lower layer, and the module graph has no cycle. Command modules (``cli.py``,
``*/commands.py``) are the top layer: they may import anything, nothing imports them but ``cli``."""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scalerec")

# package -> layer (docs/architecture.md, "Layers"); a package may import its own layer or lower ones
LAYERS = {
    "ops": 0, "dist": 0, "extras": 0, "overrides": 0,
    "data": 1,
    "models": 2, "retrieval": 2,
    "losses": 3,
    "eval": 4,
    "train": 5,
    "llm": 2, "peft": 2,  # verticals on ops: never the recommender's losses, eval or train
}
VERTICALS = {"llm": {"llm", "ops", "dist", "extras", "overrides"}, "peft": {"peft", "ops", "extras", "overrides"}}
TOP = 99


def _modules():
    for root, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                yield (rel[: -len(".__init__")] if rel.endswith(".__init__") else rel), path


def _imports(path: str, module: str) -> set[str]:
    out = set()
    is_pkg = path.endswith("__init__.py")
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("scalerec"):
                out.add(name)
                out.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("scalerec"))
    return out


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "cli" or parts[-1] == "commands":
        return TOP
    return LAYERS[parts[1]]


def _graph():
    mods = dict(_modules())
    graph = {}
    for m, path in mods.items():
        graph[m] = {t for t in _imports(path, m) if t in mods and t != m}
    return graph


def test_every_package_has_a_layer():
    pkgs = {m.split(".")[1] for m in _graph() if "." in m} - {"cli"}
    assert pkgs <= set(LAYERS), f"add {sorted(pkgs - set(LAYERS))} to LAYERS and docs/architecture.md"


def test_no_upward_imports():
    bad = []
    for m, targets in _graph().items():
        for t in targets:
            if _layer(t) == TOP and m.split(".")[1:2] != ["cli"] and _layer(m) != TOP:
                bad.append(f"{m} -> {t} (a command module)")
            elif _layer(t) != TOP and _layer(t) > _layer(m):
                bad.append(f"{m} (layer {_layer(m)}) -> {t} (layer {_layer(t)})")
            pkg = m.split(".")[1] if "." in m else ""
            if pkg in VERTICALS and _layer(m) != TOP and t.split(".")[1] not in VERTICALS[pkg]:
                bad.append(f"{m} -> {t} (the {pkg} vertical imports only {sorted(VERTICALS[pkg])})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = _graph()
    # package-level __init__ re-exports are edges too; a cycle through them is still a cycle
    color, stack, cycles = {}, [], []

    def visit(u):
        color[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if color.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in color:
                visit(v)
        stack.pop()
        color[u] = 2

    for u in sorted(graph):
        if u not in color:
            visit(u)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", ["scalerec.ops", "scalerec.dist", "scalerec.data", "scalerec.models",
                                    "scalerec.losses", "scalerec.eval"])
def test_lower_layers_import_without_the_trainer(module):
    """Importing a lower layer in a fresh interpreter never loads ``scalerec.train`` or ``scalerec.cli``."""
    import subprocess
    import sys

    code = (f"import sys, {module}; bad = [m for m in sys.modules if m.startswith(('scalerec.train', "
            f"'scalerec.cli'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
