"""The package's structure: every module imports on its own, no import cycles, small classes,
pure placement and layout math, and the linters' verdict (no processes, no collectives)."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mpgroups"
MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for path in PACKAGE.rglob("*.py")
)
MAX_CLASS_LINES = 250


def _tree(module: str) -> ast.Module:
    parts = module.split(".")
    path = ROOT.joinpath(*parts).with_suffix(".py")
    if not path.exists():
        path = ROOT.joinpath(*parts, "__init__.py")
    return ast.parse(path.read_text(), filename=str(path))


def _imports(module: str) -> set[str]:
    """The mpgroups modules ``module`` imports, anywhere in it (lazy imports included)."""
    found = set()
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n in MODULES and n != module)
    return found


def test_every_module_imports_in_a_fresh_interpreter():
    """Each module imported in a fresh interpreter. Importing any ``mpgroups.X`` first runs
    ``mpgroups/__init__`` (which imports the public modules in its own order), so one
    interpreter that imports the package and then every module finds what one interpreter per
    module would; an import cycle between two modules is found by the test below, from the
    source."""
    script = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    result = subprocess.run(
        [sys.executable, "-c", script, *MODULES], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert len(MODULES) > 20, MODULES


def test_no_import_cycle_between_modules():
    graph = {m: _imports(m) - {"mpgroups"} for m in MODULES if m != "mpgroups"}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                cycle = path[path.index(dep) :] + [dep] if dep in path else [module, dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert len(state) == len(graph)


def test_no_class_over_250_lines():
    sizes = {
        f"{module}.{node.name}": node.end_lineno - node.lineno + 1
        for module in MODULES
        for node in ast.walk(_tree(module))
        if isinstance(node, ast.ClassDef)
    }
    assert sizes, "found no classes"
    too_long = {name: n for name, n in sizes.items() if n > MAX_CLASS_LINES}
    assert not too_long, too_long


@pytest.mark.parametrize("module", ["mpgroups.sharding.placement", "mpgroups.sharding.layout"])
def test_placement_and_layout_do_not_touch_torch_distributed(module):
    imported = set()
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert not {m for m in imported if m.startswith("torch")}, imported


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=" ".join)
def test_ruff(command):
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is part of the test extra"
    result = subprocess.run(
        [ruff, *command, "."], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_design_citation_points_into_docs_design():
    """Code and docs cite the design by section (``docs/design.md`` and a section sign);
    every section cited is one there, and no citation names a document the repository does
    not hold."""
    design = (ROOT / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^## (\w+)\. ", design, flags=re.MULTILINE))
    assert {"2", "3", "3b", "4", "5", "6", "7", "8"} <= sections, sections
    cited, stray = [], []
    for folder in ("mpgroups", "tests", "benchmarks", "launch"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".md", ".sh", ".sbatch"):
                continue
            text = path.read_text()
            cited += [(path.name, n) for n in re.findall(r"docs/design\.md §(\w+)", text)]
            stray += [path.name for _ in re.findall(r"DESIGN \u00a7", text)]
    readme = (ROOT / "README.md").read_text()
    cited += [("README.md", n) for n in re.findall(r"docs/design\.md §(\w+)", readme)]
    assert len(cited) >= 19, cited
    assert not [c for c in cited if c[1] not in sections], sections
    assert not stray, stray
