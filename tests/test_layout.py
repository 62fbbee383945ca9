"""dist_gpt's layout holds: every import points down the layer order written once below (LAYERS), there is no
import cycle, and the autotuner and the trainer meet only in the build path (autotune -> engine.build <- train).
Read statically from the source with `ast`, every import counted, also those inside functions (a cycle or an
upward arrow hidden in a function still ties the two modules together)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO


def module_names(root: Path, package: str) -> dict[str, Path]:
    """{'dist_gpt.autotune.search': path, 'dist_gpt.autotune': .../__init__.py, ...}"""
    names = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The package's own modules that the module `name` (at `path`) imports, anywhere in its code."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1 more
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import dist_gpt.data.loader.x` -> the longest known prefix
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    modules = module_names(root, package)
    return {name: imported_modules(path, name, set(modules)) for name, path in modules.items()}


# The package's layers, lowest first: a module may import its own layer and those below, never one above.
# A name is a top-level module or folder of dist_gpt ("dist_gpt" itself: the package face, __version__).
LAYERS = [
    ["dist_gpt", "errors"],
    ["config", "config_render", "model", "fused_loss", "tokenizer", "configs"],  # the core
    ["data"],
    ["runtime"],
    ["parallel"],
    ["checkpoint"],
    ["interop"],
    ["engine"],
    ["autotune"],
    ["eval"],
    ["train"],
    ["tools"],
]
SHIM_MAX_LINES = 12  # any other top-level module is a `python -m dist_gpt.X` entry point: a shim above everything


def layer_of(module: str, top_level_shims: set[str]) -> int:
    """The index of module's layer in LAYERS; len(LAYERS) for the entry-point shims."""
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "dist_gpt"
    for index, names in enumerate(LAYERS):
        if head in names:
            return index
    if module in top_level_shims:
        return len(LAYERS)
    raise AssertionError(f"{module} is in no layer: put it in a folder of LAYERS (tests/test_layout.py), or make it a shim of at most {SHIM_MAX_LINES} lines")


def upward_imports(graph: dict[str, set[str]], top_level_shims: set[str]) -> list[str]:
    """Every import that points to a higher layer, as 'a (layer) -> b (layer)'."""
    name = lambda module: "/".join(LAYERS[layer_of(module, top_level_shims)]) if layer_of(module, top_level_shims) < len(LAYERS) else "entry points"
    return [
        f"{a} ({name(a)}) -> {b} ({name(b)})"
        for a, targets in sorted(graph.items())
        for b in sorted(targets)
        if layer_of(b, top_level_shims) > layer_of(a, top_level_shims)
    ]


def shims(root: Path) -> set[str]:
    layered = {name for names in LAYERS for name in names}
    return {f"dist_gpt.{p.stem}" for p in (root / "dist_gpt").glob("*.py") if p.stem not in layered | {"__init__"} and len(p.read_text().splitlines()) <= SHIM_MAX_LINES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None. Depth-first, with the path on a stack."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_dist_gpt_has_no_import_cycle():
    graph = import_graph(REPO, "dist_gpt")
    assert {"dist_gpt.engine.build", "dist_gpt.engine.step"} <= graph["dist_gpt.train.loop"]  # the graph is really read
    assert "dist_gpt.autotune" in graph["dist_gpt.train.run"]  # the import inside a function counts
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_every_import_points_down_the_layers():
    graph = import_graph(REPO, "dist_gpt")
    entry = shims(REPO)
    assert {"dist_gpt.prepare", "dist_gpt.doctor", "dist_gpt.autotune_batch"} <= entry
    assert upward_imports(graph, entry) == []


def test_an_upward_import_is_caught():
    graph = {"dist_gpt.checkpoint.checkpointer": {"dist_gpt.engine.step", "dist_gpt.runtime.safe_write"}, "dist_gpt.doctor": {"dist_gpt.tools.doctor"}}
    assert upward_imports(graph, {"dist_gpt.doctor"}) == ["dist_gpt.checkpoint.checkpointer (checkpoint) -> dist_gpt.engine.step (engine)"]
    with pytest.raises(AssertionError, match="dist_gpt.stray is in no layer"):
        upward_imports({"dist_gpt.stray": {"dist_gpt.errors"}}, set())


def test_autotuner_and_trainer_meet_only_in_the_build_path():
    graph = import_graph(REPO, "dist_gpt")
    tuner = {m for m in graph if m.startswith("dist_gpt.autotune")}
    assert "dist_gpt.train.loop" not in set().union(*(reachable(graph, m) for m in tuner))
    assert not tuner & reachable(graph, "dist_gpt.train.loop")
    assert "dist_gpt.engine.build" in reachable(graph, "dist_gpt.autotune") and "dist_gpt.engine.build" in reachable(graph, "dist_gpt.train.loop")


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import helper\n")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def helper():\n    from ..a import thing\n    return thing\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"} and graph["pkg.sub"] == {"pkg.sub.b"}
    assert find_cycle(graph) in (["pkg.a", "pkg.sub.b", "pkg.a"], ["pkg.sub.b", "pkg.a", "pkg.sub.b"])
    (pkg / "sub" / "b.py").write_text("def helper():\n    return 1\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) is None
