"""The package's layers (proxy/__init__.py): every import points down or sideways within a
layer, and no two modules import each other, directly or through others, type-only imports
included. Read with `ast`, so an import inside a function or under TYPE_CHECKING counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Bottom to top; a module may import its own layer and those before it.
LAYERS = ("protocol", "config", "tls", "policy", "ops", "runtime", "tools", "cli")


def layer_of(module: str) -> str:
    """`proxy.runtime.session` -> "runtime"; `proxy.policy` -> "policy"; `proxy.__main__` and
    `proxy.cli` -> "cli"."""
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if parts[1] in ("cli", "__main__"):
        return "cli"
    return parts[1]


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path, known: set[str]) -> set[str]:
    """The proxy modules `path` imports, relative imports resolved; `from pkg import mod` names
    the module mod when it is one, else the package."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == root.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != root.name:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    found.discard(me)
    return found


def graph(root: Path) -> dict[str, set[str]]:
    files = sorted(root.rglob("*.py"))
    known = {module_name(f, root) for f in files}
    return {module_name(f, root): imports_of(f, root, known) & known for f in files}


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = []
    for module, targets in edges.items():
        mine = layer_of(module)
        for target in targets:
            theirs = layer_of(target)
            if theirs == "package":  # the package's own docstring module
                continue
            if mine not in rank or theirs not in rank:
                bad.append(f"{module} -> {target}: not in a known layer")
            elif rank[theirs] > rank[mine]:
                bad.append(f"{module} ({mine}) imports {target} ({theirs}), a higher layer")
    return sorted(bad)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            members = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                members.append(w)
                if w == v:
                    break
            if len(members) > 1:
                found.append(sorted(members))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def test_every_module_is_in_a_layer() -> None:
    edges = graph(ROOT / "proxy")
    assert len(edges) > 20, "the checker found too few modules to mean anything"
    strays = [m for m in edges if layer_of(m) not in (*LAYERS, "package")]
    assert not strays, f"modules outside every layer: {strays}"


def test_no_import_goes_up_a_layer() -> None:
    assert upward_imports(graph(ROOT / "proxy")) == []


def test_no_import_circle() -> None:
    assert cycles(graph(ROOT / "proxy")) == []


def test_each_layer_says_what_it_owns_and_must_not_touch() -> None:
    for folder in LAYERS:
        init = ROOT / "proxy" / folder / "__init__.py"
        if not init.exists():
            continue  # policy.py and cli.py are single modules
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "Owns:" in doc and "Must not" in doc, f"{init} lacks Owns:/Must not"


# -- the checker itself can fail ------------------------------------------------------------------
def _tree(tmp: Path, files: dict[str, str]) -> Path:
    root = tmp / "proxy"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in {p.parent for p in root.rglob("*.py")}:
        (folder / "__init__.py").touch()
    return root


def test_the_checker_sees_an_upward_import_even_type_only(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "protocol/wire.py": "from typing import TYPE_CHECKING\n"
                            "if TYPE_CHECKING:\n    from ..runtime import session\n",
        "runtime/session.py": "from ..protocol import wire\n",
    })
    edges = graph(root)
    assert upward_imports(edges) == [
        "proxy.protocol.wire (protocol) imports proxy.runtime.session (runtime), a higher layer"]
    assert cycles(edges) == [["proxy.protocol.wire", "proxy.runtime.session"]]


@pytest.mark.parametrize("text", [
    "def f():\n    from .b import x\n",  # inside a function
    "from proxy.runtime import b\n",  # absolute
    "from . import b\n",  # a sibling module by name
])
def test_the_checker_sees_a_circle_within_a_layer(tmp_path: Path, text: str) -> None:
    root = _tree(tmp_path, {"runtime/a.py": text, "runtime/b.py": "from . import a\n"})
    assert cycles(graph(root)) == [["proxy.runtime.a", "proxy.runtime.b"]]


def test_the_cli_imports_no_prometheus_client_before_it_chose_the_mode() -> None:
    """prometheus-client reads PROMETHEUS_MULTIPROC_DIR once, when it is first imported; the CLI
    sets it for workers > 1 only after parsing the config. Anything `proxy.cli` imports at the
    top (ops/admin for the version, and what that imports) must leave it unimported, or the
    workers' counts would never reach the scrape (test_workers_summed)."""
    import subprocess
    import sys

    code = "import sys, proxy.cli; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
