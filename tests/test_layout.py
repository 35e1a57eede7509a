"""The package's shape, checked: no import cycles, the core never reaches up into the rooms built on
it, every module says what it owns, and no function grows past what a reader takes in at once."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "minigpt"
ROOMS = ("data", "training", "reference", "serve", "tools", "interop", "cli")
CORE = ("errors", "fsio", "config", "tokenization", "rundir", "checkpoint", "model", "kv_cache",
        "decode", "sampling", "device", "cpu", "engine", "utf8", "inspection",
        "batching", "request_events", "stop_strings", "chat_template")
# declarative tables, allowed to be long: the argparse parser and the FastAPI routes
LONG_TABLES = {("cli.py", "build_parser"), ("serve/app.py", "create_app")}


def module_name(path: Path) -> str:
    parts = ["minigpt", *path.relative_to(PKG).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _under_type_checking(tree: ast.Module) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING",
                                                                   "typing.TYPE_CHECKING"):
            for child in ast.walk(node):
                lines.add(getattr(child, "lineno", -1))
    return lines


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """minigpt modules `path` imports, at any depth of its code (lazy imports count too)."""
    tree = ast.parse(path.read_text())
    skipped = _under_type_checking(tree)
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if node.lineno in skipped if hasattr(node, "lineno") else False:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("minigpt")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if not base.startswith("minigpt"):
                continue
            for alias in node.names:  # `from . import checkpoint` imports a module
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    return {name: imports_of(path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycles():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_never_imports_the_rooms_above_it():
    room_of = lambda name: name.split(".")[1] if name.count(".") >= 1 else ""  # noqa: E731
    for name, deps in import_graph().items():
        if room_of(name) in CORE:
            upward = sorted(d for d in deps if room_of(d) in ROOMS)
            assert not upward, f"{name} imports {upward}"


def test_fsio_is_a_leaf():
    assert import_graph()["minigpt.fsio"] == set()


def test_every_module_says_what_it_owns():
    missing = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if not ast.get_docstring(
        ast.parse(p.read_text()))]
    assert not missing


def test_no_function_over_sixty_lines_outside_declarative_tables():
    long = []
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                where = (str(p.relative_to(PKG)), node.name)
                if node.end_lineno - node.lineno + 1 > 60 and where not in LONG_TABLES:
                    long.append(f"{where[0]}:{node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long


def _imported_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sys.modules))"],
                         capture_output=True, text=True, env={"PYTHONPATH": str(PKG.parent)},
                         check=True)
    return set(out.stdout.split())


def test_import_minigpt_is_lazy():
    """`import minigpt` loads no torch and no training loop; the public names still work."""
    loaded = _imported_after("import minigpt")
    assert "torch" not in loaded and "minigpt.training.trainer" not in loaded
    loaded = _imported_after("import minigpt\nminigpt.load")
    assert "minigpt.engine" in loaded and "minigpt.training.trainer" not in loaded


def test_cli_help_loads_no_torch():
    """Building the CLI (every flag's help and default) needs only the config: `--help` is quick."""
    loaded = _imported_after("import sys, runpy\nsys.argv = ['minigpt', 'train', '--help']\n"
                             "try:\n    runpy.run_module('minigpt', run_name='__main__')\n"
                             "except SystemExit:\n    pass")
    assert "minigpt.cli" in loaded and "torch" not in loaded


def test_minigpt_train_stays_the_function_after_the_training_package_is_imported():
    code = ("import minigpt, minigpt.training.trainer, minigpt.training.run\n"
            "assert callable(minigpt.train), minigpt.train\n"
            "assert minigpt.train is minigpt.training.run.train")
    subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(PKG.parent)}, check=True)
