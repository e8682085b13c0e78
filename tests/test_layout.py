"""The house rules the code is held to (README: how it is built): one ground floor of contracts
that imports nothing above it, training and the benchmarks on top of it only, rooms of a
readable size, and the environment read in one module."""

import ast
from pathlib import Path

from conftest import ROOT

MAX_LINES = 500  # a non-test module over this holds more than one job


def imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, at any depth (lazy imports inside functions included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)]
            # `from services import launch` names a module through the package
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def above_the_ground_floor(module: str) -> bool:
    return module.startswith("services.") and not module.startswith("services.contracts")


def test_training_and_loadtests_import_only_the_ground_floor():
    wrong = [f"{p.relative_to(ROOT)}:{line} imports {module}" for p in sources("training", "loadtests")
             for line, module in imports(p) if above_the_ground_floor(module) or module == "services"]
    assert not wrong, "\n".join(wrong)


def test_the_ground_floor_imports_nothing_above_it():
    wrong = [f"{p.relative_to(ROOT)}:{line} imports {module}" for p in sources("services/contracts")
             for line, module in imports(p)
             if above_the_ground_floor(module) or module.split(".")[0] in ("bentoml", "training", "loadtests")]
    assert not wrong, "\n".join(wrong)


def test_no_module_is_over_the_size_limit():
    big = [f"{p.relative_to(ROOT)}: {n} lines" for p in sources("services", "training", "loadtests")
           if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not big, "\n".join(big)


def test_the_environment_is_read_in_one_module_of_the_services():
    """services/runtime/config.py reads the environment; the launcher (its flags' defaults) and
    the process helpers (a child's environment) are the other two places that touch it."""
    allowed = {"services/runtime/config.py", "services/launch.py", "services/contracts/processes.py"}
    readers = []
    for p in sources("services"):
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")
                    and isinstance(node.value, ast.Name) and node.value.id == "os"):
                readers.append((str(p.relative_to(ROOT)), node.lineno))
    wrong = [f"{path}:{line}" for path, line in readers if path not in allowed]
    assert not wrong, "os.environ read outside services/runtime/config.py: " + ", ".join(wrong)
    private = [f"{p.relative_to(ROOT)}:{line}" for p in sources("services", "training", "loadtests")
               for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.ImportFrom)
               and node.module == "services.runtime.config" and any(a.name.startswith("_") for a in node.names)
               for line in [node.lineno]]
    assert not private, "config's private readers imported elsewhere: " + ", ".join(private)
