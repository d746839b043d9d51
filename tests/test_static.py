"""Static checks of the source tree (AST only, nothing imported): the layer order of imports, no import
cycles, no remote code, weights-only checkpoint loads."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

BRA = Path(__file__).resolve().parent.parent / "bra"

# The layers, lowest first: a module may import its own layer and the layers below it, never one above.
# bra/testing.py (model builders for tests and bench) sits above everything and nothing in bra imports it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("bra", "bra.vocab", "bra.errors", "bra.fsutil", "bra.dist", "bra.configs"),
    ("bra.cache",),
    ("bra.pipeline",),
    ("bra.organism",),
    ("bra.sae",),
    ("bra.audit",),
    ("bra.cli",),
    ("bra.testing",),
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(BRA.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> int:
    """Index in LAYERS of the longest prefix naming ``module``'s layer."""
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best_len \
                    and (name != "bra" or module == "bra"):
                best, best_len = i, len(name)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every bra module ``path`` imports, at any depth (function-level imports count too), with line."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "bra"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if base.split(".")[0] != "bra":
                continue
            for alias in node.names:  # `from bra.audit import catalog` imports the module bra.audit.catalog
                sub = f"{base}.{alias.name}"
                out.append((sub if (BRA.parent / (sub.replace(".", "/") + ".py")).is_file() else base,
                            node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in sorted(BRA.rglob("*.py")):
        me = _module_name(path)
        for target, _ in _imports(path):
            if target != me:
                graph[me].add(target)
    return graph


def test_static__imports_point_down_the_layers() -> None:
    """vocab/errors/fsutil/dist/configs <- cache <- pipeline <- organism <- sae <- audit <- cli: nothing
    imports up."""
    upward = []
    for path in sorted(BRA.rglob("*.py")):
        me = _module_name(path)
        for target, line in _imports(path):
            if _layer(target) > _layer(me):
                upward.append(f"{path.relative_to(BRA.parent)}:{line}: {me} imports {target}")
    assert not upward, "\n".join(upward)


def test_static__layer_check_orders_the_layers() -> None:
    """The checker itself: an upward import is classified as one."""
    assert _layer("bra.cache.store") < _layer("bra.pipeline.build") < _layer("bra.organism.build") \
        < _layer("bra.sae.train") \
        < _layer("bra.audit.score") < _layer("bra.cli.sae")
    assert _layer("bra.vocab") == _layer("bra.errors") == 0


def test_static__no_import_cycles() -> None:
    """The module graph (lazy, function-level imports included) has no cycle."""
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


def _calls(tree: ast.AST, attr: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == attr]


def test_static__trust_remote_code_never_enabled() -> None:
    """No `trust_remote_code=True` anywhere in bra/, and every from_pretrained passes trust_remote_code=False
    explicitly (so a default that changes upstream cannot turn it on)."""
    sources = sorted(BRA.rglob("*.py"))
    assert sources
    calls = 0
    for path in sources:
        text = path.read_text(encoding="utf-8")
        assert "trust_remote_code=True" not in text.replace(" ", ""), path
        for call in _calls(ast.parse(text), "from_pretrained"):
            calls += 1
            kw = {k.arg: k.value for k in call.keywords if k.arg is not None}
            value = kw.get("trust_remote_code")
            where = f"{path.relative_to(BRA.parent)}:{call.lineno}"
            assert isinstance(value, ast.Constant) and value.value is False, \
                f"{where}: from_pretrained without trust_remote_code=False"
        for call in _calls(ast.parse(text), "load_dataset"):
            kw = {k.arg: k.value for k in call.keywords if k.arg is not None}
            value = kw.get("trust_remote_code")
            assert value is None or (isinstance(value, ast.Constant) and value.value is False), path
    assert calls >= 5  # config, tokenizer and model loads, GGUF conversion, the report's tokenizer


def test_static__torch_load_always_weights_only() -> None:
    """Every torch.load in bra/ passes weights_only=True (pickled code in a checkpoint is refused)."""
    for path in sorted(BRA.rglob("*.py")):
        for call in _calls(ast.parse(path.read_text(encoding="utf-8")), "load"):
            if isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name) \
                    and call.func.value.id == "torch":
                kw = {k.arg: k.value for k in call.keywords if k.arg is not None}
                value = kw.get("weights_only")
                assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{call.lineno}"
