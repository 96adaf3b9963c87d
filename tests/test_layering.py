"""The import graph of the installed package: no import runs upward through the layers and no modules import each
other in a circle.

Layers, lowest first (a module imports only its own layer and those below):
    kernels   vlm_efficient.kernels.*           the attention kernels and their references
    core      vlm_efficient.<module>            engine, adapters, layouts, the method protocol and registry, models
    methods   vlm_efficient.token_ops.*, .heads.*
    api       vlm_efficient (its __init__), .shipped_methods   wrap / unwrap / stats; imports the methods so that they
                                                          register
    tools     vlm_efficient.cli, .compare, .heads.inspect, .heads.tag, .evals.*, .demos.*   commands, evals, the demo

The graph is read as installed: every module of the packages pyproject.toml installs, found through the import
system (the top-level folders are linked into `vlm_efficient`), parsed, never imported. Every import counts,
also those inside functions and under TYPE_CHECKING; `from a import b` is an edge to the module a.b where it is one,
else to a. Importing a submodule also runs its parents' __init__, which is not counted as an edge (the API's
__init__ is every module's parent)."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "vlm_efficient"
LAYERS = ("kernels", "core", "methods", "api", "tools")
TOOLS = ("vlm_efficient.cli", "vlm_efficient.compare", "vlm_efficient.heads.inspect", "vlm_efficient.heads.tag", "vlm_efficient.evals",
         "vlm_efficient.demos")  # fmt: skip


def layer(module: str) -> str:
    def under(prefix: str) -> bool:
        return module == prefix or module.startswith(prefix + ".")

    if any(under(tool) for tool in TOOLS):
        return "tools"
    if module in (PACKAGE, f"{PACKAGE}.shipped_methods"):
        return "api"
    if under("vlm_efficient.token_ops") or under("vlm_efficient.heads"):
        return "methods"
    if under("vlm_efficient.kernels"):
        return "kernels"
    return "core"


def installed_modules() -> dict[str, Path]:
    """{module name: source file} of every module of the installed packages (subpackages included)."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    modules: dict[str, Path] = {}
    for package in declared:
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.submodule_search_locations, f"{package} is not installed"
        for location in spec.submodule_search_locations:
            base = Path(location)
            for path in sorted(base.rglob("*.py")):
                parts = path.relative_to(base).with_suffix("").parts
                # a module is importable when every folder between it and the package is a package
                if any(not (base.joinpath(*parts[:i]) / "__init__.py").exists() for i in range(1, len(parts))):
                    continue
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules.setdefault(".".join((package, *parts)), path)
    return modules


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` (source at `path`) imports."""
    is_package = path.name == "__init__.py"
    targets = set()

    def resolve(dotted: str) -> str | None:
        """The longest prefix of `dotted` that is one of the package's modules."""
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in known:
                return ".".join(parts[:end])
        return None

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(resolve(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                targets.add(resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in known else resolve(base))
    targets.discard(None)
    targets.discard(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = installed_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in sorted(modules.items())}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return found


def drawn(graph: dict[str, set[str]]) -> str:
    """The graph, one module a line with its layer and what it imports."""
    short = lambda name: name.removeprefix(PACKAGE + ".") if name != PACKAGE else PACKAGE  # noqa: E731
    return "\n".join(f"  [{layer(name)}] {short(name)} -> {', '.join(sorted(map(short, targets))) or '-'}"
                     for name, targets in graph.items())  # fmt: skip


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_graph_covers_every_layer(graph):
    """The walk finds the modules it must judge (a walk that finds nothing passes everything)."""
    for module in ("vlm_efficient", "vlm_efficient.engine", "vlm_efficient.kernels.masked_attention",
                   "vlm_efficient.token_ops.fastv", "vlm_efficient.heads.pai", "vlm_efficient.cli",
                   "vlm_efficient.evals.runner", "vlm_efficient.evals.testbed.world", "vlm_efficient.demos.app"):
        assert module in graph, f"{module} is not in the installed package's graph:\n{drawn(graph)}"
    assert {layer(name) for name in graph} == set(LAYERS)
    assert "vlm_efficient.method" in graph["vlm_efficient.token_ops.fastv"]


def test_no_import_runs_upward(graph):
    upward = [f"{source} ({layer(source)}) imports {target} ({layer(target)})"
              for source, targets in graph.items() for target in sorted(targets)
              if LAYERS.index(layer(target)) > LAYERS.index(layer(source))]  # fmt: skip
    assert not upward, "imports running up the layers:\n  " + "\n  ".join(upward) + "\n\nthe graph:\n" + drawn(graph)


def test_no_cycles(graph):
    unexpected = [sorted(cycle) for cycle in cycles(graph)]
    assert not unexpected, f"modules that import each other in a circle: {unexpected}\n\nthe graph:\n{drawn(graph)}"


def test_the_checks_catch_what_they_look_for():
    """An upward import and a cycle planted in a small graph are reported."""
    planted = {"vlm_efficient.engine": {"vlm_efficient.evals.runner"}, "vlm_efficient.evals.runner": set(),
               "vlm_efficient.a": {"vlm_efficient.b"}, "vlm_efficient.b": {"vlm_efficient.c"},
               "vlm_efficient.c": {"vlm_efficient.a"}}  # fmt: skip
    assert cycles(planted) == [{"vlm_efficient.a", "vlm_efficient.b", "vlm_efficient.c"}]
    assert LAYERS.index(layer("vlm_efficient.evals.runner")) > LAYERS.index(layer("vlm_efficient.engine"))


def test_imports_resolve_to_modules(tmp_path):
    known = {"vlm_efficient", "vlm_efficient.kernels", "vlm_efficient.method", "vlm_efficient.cli",
             "vlm_efficient.heads", "vlm_efficient.heads.common", "vlm_efficient.heads.pai"}  # fmt: skip
    module = tmp_path / "mod.py"
    module.write_text("from . import common\nfrom .common import has_image\nfrom .. import kernels\n"
                      "from ..method import Method\nimport vlm_efficient.cli\nfrom vlm_efficient import wrap\n")
    assert imports_of("vlm_efficient.heads.mod", module, known) == {
        "vlm_efficient.heads.common", "vlm_efficient.kernels", "vlm_efficient.method", "vlm_efficient.cli",
        "vlm_efficient"}  # fmt: skip
    package = tmp_path / "__init__.py"
    package.write_text("def f():\n    from . import pai\n    from .common import x\n")
    assert imports_of("vlm_efficient.heads", package, known) == {"vlm_efficient.heads.pai", "vlm_efficient.heads.common"}


def test_the_checkout_root_shadows_no_package():
    """Run from the checkout's root (`python -m pytest`, `python -c`), Python puts the root first on sys.path. The
    top-level folders installed as vlm_efficient's subpackages hold no __init__.py there, so none of them is a regular
    package that would shadow an installed one of the same name (Hugging Face's `kernels`, which transformers
    imports; `evals` and `demos` exist on PyPI too): a folder without __init__.py is a namespace portion, which loses
    to a regular package anywhere on sys.path. And importing vlm_efficient leaves sys.path as it found it."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    folders = [name.split(".")[1] for name in declared if name.count(".") == 1]
    assert {"kernels", "evals", "demos", "heads", "token_ops"} <= set(folders)
    for folder in folders:
        assert (ROOT / PACKAGE / folder).resolve() == ROOT / folder, f"{PACKAGE}/{folder} must link to ../{folder}"
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py makes the root's {folder}/ shadow" \
            f" any installed `{folder}` package; put its content in a module (as kernels/api.py)"
    probe = (
        "import importlib.util, json, sys\n"
        "before = list(sys.path)\n"
        "import transformers, vlm_efficient, vlm_efficient.kernels.api\n"
        f"specs = {{name: importlib.util.find_spec(name) for name in {folders!r}}}\n"
        "print(json.dumps({'root_first': sys.path[0] == '', 'path_kept': sys.path == before,\n"
        "    'regular': {name: spec.origin for name, spec in specs.items() if spec is not None and spec.origin},\n"
        "    'kernels': getattr(sys.modules.get('kernels'), '__file__', None)}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["root_first"] and found["path_kept"], found
    shadowing = {name: origin for name, origin in found["regular"].items() if Path(origin).is_relative_to(ROOT / name)}
    assert not shadowing, f"regular packages of the checkout's root found by their folder name: {shadowing}"
    assert found["kernels"] is None or not Path(found["kernels"]).is_relative_to(ROOT / "kernels"), found


if __name__ == "__main__":  # python tests/test_layering.py: print the graph (for a closing note or a review)
    print(drawn(import_graph()))
