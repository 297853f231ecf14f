"""The package's layout holds: no import cycle among harness modules, each folder imports only
from the folders below it (docs/design.md, "Layers"), and the CLI only parses arguments.

Every import counts, function-local and TYPE_CHECKING ones included: a lazy import is still a
dependency, and a cycle hidden in a function is the one that breaks a refactoring later.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "harness"

# Lowest first; a module of a folder may import its own folder and the folders before it.
# The top-level modules (the CLI, the commands it calls, the design document's generator)
# stand above every folder; `terminal` (the console and the exit on bad input) below them all.
LAYERS = ("terminal", "study", "store", "runs", "report", "launch")
TOP = len(LAYERS)
COMMAND_BODY_LINES = 40


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The harness modules that ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                target = submodule if submodule in known else source
                if target in known:
                    found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, set(known)) for name, path in known.items()}


def layer(name: str) -> int:
    parts = name.split(".")
    if len(parts) == 1:  # harness/__init__.py
        return TOP
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else TOP


def test_every_module_is_in_a_known_place():
    for name in modules():
        parts = name.split(".")
        if len(parts) > 2:
            assert parts[1] in LAYERS, f"{name}: a folder not in LAYERS {LAYERS}; add it where its imports allow"


def test_no_folder_imports_a_folder_above_it():
    wrong = [
        f"{name} ({LAYERS[layer(name)] if layer(name) < TOP else 'top'}) imports {target}"
        for name, targets in import_graph().items()
        for target in sorted(targets)
        if layer(target) > layer(name)
    ]
    assert not wrong, "imports against the layer order " + " < ".join(LAYERS) + ":\n" + "\n".join(wrong)


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_the_layer_order_is_the_one_the_design_document_states():
    design = (PACKAGE.parent / "docs" / "design.md").read_text()
    assert " < ".join(f"`{name}`" for name in LAYERS) in design


def test_cli_commands_only_parse_and_call():
    """Each command's body (after its docstring) fits in COMMAND_BODY_LINES lines: the work is
    done in the packages, where it can be read and tested without the command line."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    long = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any(
            isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "command" for d in node.decorator_list
        ):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]
            lines = body[-1].end_lineno - body[0].lineno + 1 if body else 0
            if lines > COMMAND_BODY_LINES:
                long.append(f"{node.name}: {lines} lines")
    assert not long, f"commands over {COMMAND_BODY_LINES} lines: {', '.join(long)}"


def test_a_back_import_is_caught(tmp_path):
    """The checks above see a function-local import of a higher folder."""
    source = "def f():\n    from ..launch.local import LocalLauncher\n"
    path = tmp_path / "harness" / "study" / "spec.py"
    path.parent.mkdir(parents=True)
    path.write_text(source)
    known = {"harness.study.spec", "harness.launch.local", "harness.launch", "harness.study"}
    found = imported("harness.study.spec", path, known)
    assert found == {"harness.launch.local"}
    assert layer("harness.launch.local") > layer("harness.study.spec")
