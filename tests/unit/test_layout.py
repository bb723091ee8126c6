"""The import graph follows the layout (docs/design.md: "Layout"): dependencies point one way.

Every import in the runtime packages, function-local ones included, is read
from the source; each package may import only the layers below it.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The part of Herald each one may import (besides itself); a module is placed by
# its longest prefix here.
ALLOWED = {
    "pipeline.core": set(),
    "pipeline.store": {"pipeline.core"},
    "pipeline.kafka": {"pipeline.core"},
    "pipeline.taskqueue": {"pipeline.core"},
    "pipeline.rules": {"pipeline.core"},
    "pipeline.ingest": {"pipeline.core"},
    "pipeline.dlq": {"pipeline.core"},
    "pipeline.webhooks": {"pipeline.core", "pipeline.store"},
    "pipeline.archive": {"pipeline.core", "pipeline.store"},
    "pipeline.bridge": {"pipeline.core", "pipeline.store", "pipeline.kafka", "pipeline.dlq", "pipeline.taskqueue",
                        "pipeline.webhooks"},
    "pipeline.release": {"pipeline.core", "pipeline.archive", "pipeline.kafka"},
    "tasks": {"pipeline"},
    "web": {"pipeline"},
}


def _layer(module: str) -> str | None:
    for name in sorted(ALLOWED, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    return None


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path):
    """(imported module, line, at module level) for each Herald import in a file."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [f"{base}.{alias.name}" if _is_package(base) else base for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("pipeline", "tasks", "web", "devtools"):
                yield name, node.lineno, id(node) in top


def _is_package(module: str) -> bool:
    return (ROOT / module.replace(".", "/") / "__init__.py").exists()


RUNTIME = sorted(p for pkg in ("pipeline", "tasks", "web") for p in (ROOT / pkg).rglob("*.py")
                 if p != ROOT / "pipeline" / "__init__.py")  # a docstring only


@pytest.mark.parametrize("path", RUNTIME, ids=lambda p: str(p.relative_to(ROOT)))
def test_each_module_imports_only_the_layers_below_it(path):
    here = _layer(_module_name(path))
    assert here, f"{path} is in no layer of ALLOWED (docs/design.md: Layout)"
    allowed = ALLOWED[here] | {here}
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {name}" for name, line, _ in _imports(path)
             if not any(name == a or name.startswith(a + ".") for a in allowed)
             and not (name.startswith("devtools") and path == ROOT / "web" / "cli.py")]
    assert not wrong, "\n".join(wrong)


def test_development_tooling_is_never_imported_at_module_level_by_the_runtime():
    wrong = [f"{p.relative_to(ROOT)}:{line}" for p in RUNTIME for name, line, top in _imports(p)
             if name.startswith("devtools") and top]
    assert not wrong, wrong


def test_the_checker_sees_a_wrong_import(tmp_path):
    # A check that cannot fail is no check: a core module importing the store is caught.
    probe = ROOT / "pipeline" / "core" / "_probe_layout.py"
    probe.write_text("from pipeline.store import Store\n")
    try:
        with pytest.raises(AssertionError, match="imports pipeline.store"):
            test_each_module_imports_only_the_layers_below_it(probe)
    finally:
        probe.unlink()
