"""The package's shape: one subpackage per pipeline stage, each importing only from the stages below it.

Walks every module's imports (function-level ones included) with `ast`, so a lazy import cannot
hide an upward dependency or a loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "skinclf"
# Lowest first. A module may import its own stage and every stage before it; the top-level
# modules (config, errors, files, ...) are the ground floor, and the CLI sits above everything.
STAGES = ("", "data", "model", "engines", "batch", "evaluation", "trust", "training", "web", "cli")
MAX_LINES = 600
MAX_TOP_LEVEL = 12


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(module: str) -> str:
    parts = module.split(".")
    if module == "skinclf.__main__":  # `python -m skinclf` is the CLI
        return "cli"
    if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()):
        return parts[1]
    return ""


def imports_of(path: Path) -> set[str]:
    """Every skinclf module `path` imports, at any depth in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "skinclf":
            for alias in node.names:  # `from skinclf.model import bundle` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _is_module(sub) else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "skinclf")
    return found


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_subpackage_is_a_known_stage_with_a_docstring() -> None:
    # A folder of modules without __init__.py still imports from a checkout (a namespace package),
    # which hides a file the wheel or git left out; every stage has one.
    folders = {p.parent for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE}
    assert not [f for f in folders if not (f / "__init__.py").is_file()], "a subpackage without __init__.py"
    for init in PACKAGE.glob("*/__init__.py"):
        stage = init.parent.name
        assert stage in STAGES, f"skinclf/{stage}/ is not in the stage order {STAGES}"
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc.splitlines()) >= 2, f"skinclf/{stage}/__init__.py needs a docstring: what, imports, entry points"


def test_no_upward_import() -> None:
    rank = {stage: i for i, stage in enumerate(STAGES)}
    upward = [f"{m} ({stage_of(m) or 'ground'}) imports {dep} ({stage_of(dep) or 'ground'})"
              for m, deps in graph().items() for dep in deps
              if dep != "skinclf" and rank[stage_of(dep)] > rank[stage_of(m)]]
    assert upward == []


def test_no_import_loop() -> None:
    edges = {m: {d for d in deps if d != "skinclf" and d != m} for m, deps in graph().items()}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            pytest.fail("import loop: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        for dep in sorted(edges.get(node, ())):
            visit(dep, path + [node])
        done.add(node)

    for module in sorted(edges):
        visit(module, [])


def test_modules_are_short_and_the_top_level_is_small() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, top


def test_the_layout_test_sees_a_planted_upward_import(tmp_path: Path) -> None:
    planted = tmp_path / "x.py"
    planted.write_text("def f():\n    from skinclf.web.routes import create_app\n", encoding="utf-8")
    assert imports_of(planted) == {"skinclf.web.routes"}
    assert stage_of("skinclf.web.routes") == "web" and stage_of("skinclf.config") == ""


def test_no_source_file_matches_an_ignore_pattern() -> None:
    # The wheel's build (hatchling) leaves out what .gitignore names: `data/` once dropped
    # skinclf/data/ from every installed copy while the checkout's tests still passed.
    import shutil
    import subprocess

    root = PACKAGE.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(p.relative_to(root)) for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    done = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=root, capture_output=True, text=True,
                          check=False)
    assert done.stdout.strip() == "", f"ignored by git, so left out of the wheel: {done.stdout.split()}"


# --- names, signatures and what the tests import ------------------------------------------------
MAX_PARAMETERS = 12
TESTS = Path(__file__).resolve().parent


def test_no_two_modules_share_a_base_name() -> None:
    # `metadata.py` in three stages said nothing about which metadata; a name says its job.
    seen: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name not in ("__init__.py", "__main__.py"):
            seen.setdefault(path.name, []).append(str(path.relative_to(PACKAGE)))
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}


def test_no_function_takes_more_than_twelve_parameters() -> None:
    # A command's many options travel as one settings object (config.TrainConfig, PredictConfig, ...).
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
                if count > MAX_PARAMETERS:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({count})")
    assert long == []


def defined_names(path: Path) -> set[str]:
    """What a module defines or imports at its top level (read with `ast`: no import, so no
    optional dependency is needed to check it)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def source_of(module: str) -> Path | None:
    """The file of a skinclf module or a tests/utils helper, None if there is none."""
    root, parts = (PACKAGE.parent, module.split(".")) if module.startswith("skinclf") else (TESTS, module.split("."))
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def missing_imports(path: Path) -> list[str]:
    """Every `from skinclf... import name` (and `utils...`) in `path`, at any depth, whose module
    or name does not exist."""
    missing = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("skinclf", "utils"):
            source = source_of(node.module)
            if source is None:
                missing.append(f"{path.name}:{node.lineno} {node.module}")
                continue
            names = defined_names(source)
            missing += [f"{path.name}:{node.lineno} {node.module}.{a.name}" for a in node.names
                        if a.name not in names and source_of(f"{node.module}.{a.name}") is None]
        elif isinstance(node, ast.Import):
            missing += [f"{path.name}:{node.lineno} {a.name}" for a in node.names
                        if a.name.split(".")[0] == "skinclf" and source_of(a.name) is None]
    return missing


def test_every_name_a_test_imports_exists() -> None:
    # A test skipped for a missing extra (PyTorch, Ray, a browser) still has its imports checked.
    missing = [m for path in TESTS.rglob("*.py") for m in missing_imports(path)]
    assert missing == []
    # A test importing another test module finds it only when pytest happened to collect that
    # folder first: shared helpers live in tests/utils/.
    across = [f"{path.relative_to(TESTS)}:{node.lineno} {node.module}" for path in TESTS.rglob("test_*.py")
              for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
              if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("test_")
              and not (path.parent / f"{node.module}.py").is_file()]
    assert across == []


def test_the_import_check_sees_a_stale_name(tmp_path: Path) -> None:
    stale = tmp_path / "test_stale.py"
    stale.write_text("def test():\n    from skinclf.train import train_model\n    from skinclf.model import load_bundle\n",
                     encoding="utf-8")
    assert missing_imports(stale) == ["test_stale.py:2 skinclf.train", "test_stale.py:3 skinclf.model.load_bundle"]
