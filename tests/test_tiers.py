"""The test tiers mean what they say (read from the test sources, not run).

- A test that starts a process or a server on a port — directly, through a helper of its module,
  or through a fixture — is marked `e2e`, so `make test-fast` (`pytest -m "not e2e"`) runs none.
- No test asserts on a wall time: an elapsed time is a measurement for a benchmark script.
- `make test-fast` leaves out `e2e` and `slow` (the TOFU benchmark, fuzzing, and repeats or variants of in-process pipelines);
  `make test`, which `.ci/run` runs, deselects nothing. A `slow` mark is per test, never a whole
  module's, so a module keeps its quick tests in the fast tier.
"""

from __future__ import annotations

import ast
import functools
import re
import shlex
import tomllib
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
# What starts a process or a listening server in this repository.
STARTERS = {"subprocess", "Popen", "LocalServer", "start_worker", "start_server_process", "uvicorn"}
CLOCKS = {"perf_counter", "monotonic", "time"}


def _names(node: ast.AST) -> set[str]:
    found = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Name):
            found.add(child.id)
        elif isinstance(child, ast.Attribute):
            found.add(child.attr)
        elif isinstance(child, ast.arg):
            found.add(child.arg)
    return found


def _marks_e2e(decorators: list[ast.expr]) -> bool:
    return any("e2e" in _names(d) for d in decorators)


def _module_marked(tree: ast.Module, mark: str) -> bool:
    return any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
               and mark in _names(n.value) for n in tree.body)


def make_recipe(makefile: str, target: str) -> list[list[str]]:
    """The commands of a Makefile target, as argv (variables left as written)."""
    block = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)*)", makefile, re.M)
    assert block, f"no target {target}"
    return [shlex.split(line) for line in block.group(1).splitlines()]


def pytest_argv(recipe: list[list[str]]) -> list[str]:
    """The arguments after `-m pytest` of the one pytest command of a recipe."""
    runs = [argv[argv.index("pytest") + 1:] for argv in recipe if "pytest" in argv]
    assert len(runs) == 1, recipe
    return runs[0]


def marker_expression(args: list[str]) -> str | None:
    return args[args.index("-m") + 1] if "-m" in args else None


def _functions(tree: ast.Module):
    """Module-level functions and methods of module-level classes."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            yield node, []
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    yield item, node.decorator_list


def _starting(functions: dict[str, ast.FunctionDef]) -> set[str]:
    """Names of the functions (fixtures and helpers) that start a process, followed through calls."""
    uses = {name: _names(node) for name, node in functions.items()}
    starting: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, names in uses.items():
            if name not in starting and names & (STARTERS | starting):
                starting.add(name)
                changed = True
    return starting


@functools.cache
def _trees() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), str(path)) for path in sorted(TESTS.rglob("*.py"))}


def test_every_test_that_starts_a_process_is_marked_e2e():
    trees = _trees()
    offenders = []
    for path, tree in trees.items():
        if not path.name.startswith("test_") or path.name == "test_tiers.py":
            continue
        # fixtures of the conftest files above this file, and this file's own functions
        scope = {n.name: n for p, t in trees.items() if p.name == "conftest.py" and p.parent in path.parents
                 for n, _ in _functions(t)}
        scope.update({n.name: n for n, _ in _functions(tree)})
        starting = _starting(scope)
        for node, class_decorators in _functions(tree):
            if not node.name.startswith("test_"):
                continue
            uses = _names(node) & (STARTERS | starting)
            if uses and not (_module_marked(tree, "e2e") or _marks_e2e(node.decorator_list) or _marks_e2e(class_decorators)):
                offenders.append(f"{path.relative_to(TESTS)}::{node.name} (uses {sorted(uses)})")
    assert not offenders, "mark these e2e:\n" + "\n".join(offenders)


def test_no_test_asserts_a_wall_time():
    offenders = []
    for path, tree in _trees().items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Assert):
                continue
            for sub in ast.walk(node.test):
                if isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.Sub) and _names(sub) & CLOCKS:
                    offenders.append(f"{path.relative_to(TESTS)}:{node.lineno}")
    assert not offenders, "elapsed times asserted (measure them in a benchmark instead):\n" + "\n".join(offenders)


def test_the_checks_find_what_they_look_for():
    """Armed: an unmarked test starting a server, and an asserted elapsed time, are found."""
    tree = ast.parse(
        "import subprocess\n"
        "def helper():\n    return subprocess.run(['true'])\n"
        "def test_a():\n    helper()\n"
        "def test_b():\n    t = time.perf_counter()\n    assert time.perf_counter() - t < 1\n"
    )
    functions = {n.name: n for n, _ in _functions(tree)}
    assert _starting(functions) == {"helper", "test_a"}
    asserts = [n for n in ast.walk(tree) if isinstance(n, ast.Assert)]
    assert any(isinstance(s, ast.BinOp) and _names(s) & CLOCKS for s in ast.walk(asserts[0].test))
    assert _module_marked(ast.parse("pytestmark = [pytest.mark.slow]"), "slow")
    assert not _module_marked(ast.parse("@pytest.mark.slow\ndef test_a(): pass"), "slow")
    makefile = 'x:\n\t$(BIN)/python -m pytest -m "not e2e" -n 2\n\ty: z\n\nt:\n\techo\n'
    assert pytest_argv(make_recipe(makefile, "x")) == ["-m", "not e2e", "-n", "2"]
    assert marker_expression(pytest_argv(make_recipe(makefile, "x"))) == "not e2e"


def test_the_fast_tier_leaves_out_e2e_and_slow_and_the_full_suite_runs_everything():
    makefile = (REPO / "Makefile").read_text()
    pytest_options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert {m.split(":")[0] for m in pytest_options["markers"]} >= {"e2e", "slow"}
    assert not {"-m", "-k", "--deselect", "--ignore"} & set(shlex.split(pytest_options["addopts"]))
    assert marker_expression(pytest_argv(make_recipe(makefile, "test-fast"))) == "not e2e and not slow"
    assert marker_expression(pytest_argv(make_recipe(makefile, "test-slow"))) == "slow and not e2e"
    full = pytest_argv(make_recipe(makefile, "test"))
    assert not {"-m", "-k", "--deselect", "--ignore", "-x"} & set(full), full
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "make test"  # the README's test command, on everything
    assert 'pytest -m "not e2e and not slow"' in (REPO / "README.md").read_text()


def test_slow_marks_are_per_test():
    offenders = [str(path.relative_to(TESTS)) for path, tree in _trees().items() if _module_marked(tree, "slow")]
    assert not offenders, "mark the slow tests of these modules one by one:\n" + "\n".join(offenders)
