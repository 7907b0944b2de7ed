"""The house rules on imports, read from the source (every import, at module level or inside a
function): no import cycle between modules, none between packages, kernels/ and quant/ never
import core/, and the apps depend on the core, never the reverse."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the package `llmkit`
SKIP = {"tests", "scripts", "docs", "heads", ".venv", "venv", "build", ".git"}
APPS = ("llmkit.core.serve", "llmkit.core.bench", "llmkit.core.mtp_train", "llmkit.core.convert",
        "llmkit.core.perplexity", "llmkit.core.api")  # fmt: skip


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT)
        if rel.parts[0] in SKIP or rel.name == "setup.py":
            continue
        parts = ["llmkit", *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The llmkit modules `name` imports (a `from pkg import mod` counts as importing pkg.mod)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: _imports(n, p, set(mods)) for n, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _package(m: str) -> str:
    """The unit of the package-level graph: llmkit.X, or llmkit.core.X for the core's parts."""
    parts = m.split(".")
    return (
        ".".join(parts[:3])
        if parts[:2] == ["llmkit", "core"] and len(parts) > 2
        else ".".join(parts[:2])
    )


def test_no_module_import_cycle():
    assert _cycles(_graph()) == []


def test_no_package_import_cycle():
    g: dict[str, set[str]] = {}
    for m, deps in _graph().items():
        g.setdefault(_package(m), set()).update(
            _package(d) for d in deps if _package(d) != _package(m)
        )
    assert _cycles(g) == []


def test_layers():
    g = _graph()
    assert "llmkit.core.models.loader" in g and "llmkit.kernels.ops" in g  # the walk sees the tree
    for m, deps in g.items():
        if m.startswith(("llmkit.kernels", "llmkit.quant", "llmkit.errors")):
            bad = {d for d in deps if d.startswith(("llmkit.core", "llmkit.cli"))}
            assert not bad, f"{m} imports {bad}: kernels/ and quant/ stay leaves"
        if m.startswith("llmkit.core"):
            assert not {d for d in deps if d.startswith("llmkit.cli")}, m
        if m.startswith("llmkit.core") and not m.startswith(APPS):
            bad = {d for d in deps if d.startswith(APPS)}
            assert not bad, f"{m} imports the app(s) {bad}: apps depend on the core, not back"


TORCH_FREE = (
    "llmkit.cli.app", "llmkit.core.api", "llmkit.core.lean.load", "llmkit.core.decode.loop",
    "llmkit.core.decode.sampling", "llmkit.core.decode.speculative", "llmkit.core.decode.grammar",
    "llmkit.core.archs.llama", "llmkit.core.archs.gemma3", "llmkit.core.model.specs",
    "llmkit.kernels.native_bind", "llmkit.kernels.rope_table", "llmkit.core.tokenizer",
    "llmkit.core.model.protocol",
)  # fmt: skip


def test_the_torch_free_runtime_imports_without_torch():
    """What `llm run` imports on the torch-free runtime (core/lean/; torch's import alone is
    ~220 MB of RSS and over a second): the CLI, the API, the runtime, the decode loop and
    sampler, the architectures as data, the native binding, the tokenizer."""
    import subprocess
    import sys

    code = (
        f"import sys; import {', '.join(TORCH_FREE)}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
