"""The house plan holds: no import cycle in src/dlfer, each subpackage says what it holds, and every DVC
stage depends on all the code it runs and every file its command reads, so a change cannot leave a stage
looking up to date (imports inside functions count too)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]
SOURCE = PROJECT / "src"
PACKAGE = SOURCE / "dlfer"


def module_file(name: str) -> Path | None:
    """The file that runs when `name` (dotted) is imported: a package's __init__.py or a module."""
    base = SOURCE.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def imported_files(path: Path) -> set[Path]:
    """dlfer files that importing or running `path` executes directly, parent packages' __init__ included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dlfer":
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.split(".")[0] == "dlfer"}
    parts = [name.split(".") for name in names]
    return {file for part in parts for end in range(1, len(part) + 1)
            if (file := module_file(".".join(part[:end]))) is not None} - {path}


def import_closure(path: Path) -> set[Path]:
    seen, pending = set(), [path]
    while pending:
        for file in imported_files(pending.pop()) - seen:
            seen.add(file)
            pending.append(file)
    return seen


def test_no_module_imports_itself_through_others():
    modules = sorted(PACKAGE.rglob("*.py"))
    # A package's __init__ runs before its modules whatever they import, so it is not an edge of a cycle.
    graph = {path: {file for file in imported_files(path) if file.name != "__init__.py"} for path in modules}
    cycles = []

    def visit(module, trail):
        for name in sorted(graph[module]):
            if name in trail:
                cycles.append(" -> ".join(str(p.relative_to(PACKAGE)) for p in [*trail[trail.index(name):], name]))
            elif name not in done:
                visit(name, [*trail, name])
        done.add(module)

    done: set[Path] = set()
    for module in modules:
        if module not in done:
            visit(module, [module])
    assert not cycles, f"import cycles: {sorted(set(cycles))}"


def test_the_cycle_check_sees_a_cycle(tmp_path):
    (tmp_path / "a.py").write_text("from dlfer.files import read_json\n")
    assert PACKAGE / "files.py" in imported_files(tmp_path / "a.py")
    assert PACKAGE / "__init__.py" in imported_files(tmp_path / "a.py")


def test_each_subpackage_says_what_it_holds():
    for init in PACKAGE.glob("*/__init__.py"):
        docstring = ast.get_docstring(ast.parse(init.read_text())) or ""
        modules = [path.stem for path in init.parent.glob("*.py") if not path.name.startswith("__")]
        missing = [module for module in modules if not re.search(rf"\b{module}\b", docstring)]
        assert docstring and not missing, f"{init.relative_to(PROJECT)}: docstring does not name {missing}"


def stages() -> dict[str, dict]:
    """dvc.yaml's stages, a foreach stage once with its first item."""
    pipeline = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    first_variant = pipeline["vars"][0]["variants"][0]
    result = {}
    for name, stage in pipeline["stages"].items():
        if "foreach" in stage:
            stage = yaml.safe_load(yaml.safe_dump(stage["do"]).replace("${item}", first_variant))
        result[name] = stage
    return result


def declared(stage: dict, key: str) -> list[str]:
    return [next(iter(entry)) if isinstance(entry, dict) else entry for entry in stage.get(key, [])]


def covered(path: str, entries: list[str]) -> bool:
    return any(path == entry or path.startswith(entry.rstrip("/") + "/") for entry in entries)


def test_every_stage_depends_on_the_code_it_runs():
    for name, stage in stages().items():
        script = re.search(r"python (stages/\S+\.py)", stage["cmd"]).group(1)
        deps = declared(stage, "deps")
        needed = {script, *(str(path.relative_to(PROJECT)) for path in import_closure(PROJECT / script))}
        missing = sorted(path for path in needed if not covered(path, deps))
        assert not missing, f"dvc.yaml stage {name} runs {missing} without declaring them in deps"


def test_every_path_a_stage_command_names_is_a_dep_or_an_output():
    for name, stage in stages().items():
        paths = re.findall(r"--[a-z-]+ ([\w./-]+/[\w./-]+|[\w-]+\.(?:yaml|json|npz|parquet))", stage["cmd"])
        entries = declared(stage, "deps") + [entry for key in ("outs", "metrics", "plots")
                                             for entry in declared(stage, key)] + ["params.yaml"]
        holds_entries = [path for path in paths if any(entry.startswith(path + "/") for entry in entries)]
        missing = sorted(path for path in paths if not covered(path, entries) and path not in holds_entries)
        assert not missing, f"dvc.yaml stage {name}: its command names {missing}, which are neither deps nor outputs"


def test_the_coverage_check_sees_a_missing_dep():
    assert not covered("src/dlfer/model/train.py", ["src/dlfer/data", "src/dlfer/model.py"])
    assert covered("src/dlfer/model/train.py", ["src/dlfer/model"])


def test_the_variants_are_dvc_yamls():
    from dlfer.params import VARIANTS

    assert tuple(yaml.safe_load((PROJECT / "dvc.yaml").read_text())["vars"][0]["variants"]) == VARIANTS
