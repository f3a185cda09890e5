"""The package's import graph, read from the source: no import cycles, no import up the layers, and `modeling/`
imports only its siblings.

Every import counts, also one inside a function or under `TYPE_CHECKING`: an import moved into a function still
makes a cycle, it only hides it until the function runs. Importing `hybridize.a.b` also runs `hybridize/a/__init__.py`,
so it is an edge to `hybridize.a` as well.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hybridize"

# Cycles allowed to remain while they are being removed; nothing may join one, and each must leave this list when it
# is gone. Empty: the package has none.
KNOWN_CYCLES: set[frozenset[str]] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imported(module: str) -> set[str]:
    """The package's modules that `module` imports, anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x` in a.b.c names a.b, `from .. import x` names a
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from a import b` may import module a.b
    # importing a.b.c runs a.b's __init__ too, unless a.b is a package this module is in (it runs first anyway)
    parents = {".".join(name.split(".")[:i]) for name in found for i in range(2, name.count(".") + 1)}
    found |= {name for name in parents if not module.startswith(f"{name}.")}
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: _imported(module) for module in MODULES}


def _reachable(start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for target in GRAPH[stack.pop()] - seen:
            seen.add(target)
            stack.append(target)
    return seen


def test_no_import_cycles_but_the_known_ones():
    reach = {module: _reachable(module) for module in GRAPH}
    cycles = {
        frozenset({m for m in reach[module] if module in reach[m]}) for module in GRAPH if module in reach[module]
    }
    new = [sorted(cycle) for cycle in cycles - KNOWN_CYCLES]
    gone = [sorted(cycle) for cycle in KNOWN_CYCLES - cycles]
    assert not new, f"import cycles {new}: move what both sides need into a module below them"
    assert not gone, f"{gone} are no longer cycles: remove them from KNOWN_CYCLES"


def test_modeling_imports_only_its_siblings():
    """`modeling/` ships with every checkpoint as remote code (`auto_map`), where hybridize may not be installed, and
    transformers copies only the files a `from .x import` names, into one flat folder."""
    bad = []
    for path in sorted((PACKAGE / "modeling").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level > 1 or (node.module or "").startswith("hybridize")):
                bad.append(f"{path.name}:{node.lineno}")
            elif isinstance(node, ast.Import) and any(alias.name.startswith("hybridize") for alias in node.names):
                bad.append(f"{path.name}:{node.lineno}")
    assert not bad, f"modeling/ imports from outside modeling/ at {bad}; import a sibling relatively (from .x import)"


# The package's layers, lowest first (DESIGN.md, "Layout"): a module imports only modules of its own layer or below.
# `hybridize/__init__.py`, the public API, is above them all: it re-exports lazily, on attribute access.
LAYERS = [
    {"modeling", "errors", "validation", "compat", "fingerprint"},
    {"configs"},
    {"io", "families", "provenance", "saving", "sources", "remote_code"},
    {"surgery"},
    {"evaluate"},
    {"convert"},
    {"mixers", "distill", "compress", "analyze", "export", "generate", "llamacpp", "model_card", "hub"},
    {"pipeline"},
    {"cli", "__main__", "evals_tasks"},
]


def _layer(module: str) -> int | None:
    """The index in `LAYERS` of `hybridize.<room>...`; `None` for the package itself."""
    room = module.split(".")[1] if "." in module else None
    if room is None:
        return None
    found = [i for i, rooms in enumerate(LAYERS) if room in rooms]
    assert found, f"{module} is in no layer: add hybridize.{room} to LAYERS (and to DESIGN.md's layout)"
    return found[0]


def test_no_module_imports_a_layer_above_its_own():
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if _layer(module) is not None and _layer(target) is not None and _layer(target) > _layer(module)
    )
    assert not upward, f"imports that point up the layers: {upward}; move what both need down, or pass it in"
