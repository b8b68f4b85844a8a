"""The import rule of docs/architecture.md: imports run cli -> stages -> utils, a stage uses only earlier stages,
and nothing but pipeline/cli imports the command line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the stages in the order the data flows; a module may import its own stage and the ones before it
ORDER = ("utils", "data", "model", "training", "inference", "evaluation", "cli")


def _imports(source: str, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return found


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 1 and parts[1] in ORDER else None


def _violations(source: str, name: str, package: str) -> list[str]:
    bad = []
    for module in _imports(source, name):
        target = _stage(module)
        if module.split(".")[0] == "pipeline" and len(module.split(".")) > 1 and target is None:
            if module.split(".")[1] not in ("__main__",):
                bad.append(f"{name} imports {module}: not a stage of pipeline/")
        if module == "pipeline.cli" or module.startswith("pipeline.cli.") or module == "pipeline.__main__":
            if package != "cli" and package != "__main__":
                bad.append(f"{name} imports the command line ({module})")
            continue
        if target is None:
            continue
        if package == "transforms":
            if target != "utils":
                bad.append(f"{name} imports {module}: transforms may use pipeline.utils only")
        elif package in ORDER and ORDER.index(target) > ORDER.index(package):
            bad.append(f"{name} ({package}) imports the later stage {module}")
    return bad


def test_imports_run_one_way() -> None:
    bad = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        rel = path.relative_to(REPO / "pipeline").parts
        bad += _violations(path.read_text(), str(path.relative_to(REPO)), rel[0] if len(rel) > 1 else path.stem)
    for path in sorted((REPO / "transforms").rglob("*.py")):
        bad += _violations(path.read_text(), str(path.relative_to(REPO)), "transforms")
    assert not bad, "\n".join(bad)


def test_pipeline_top_level_holds_only_the_stages() -> None:
    top = sorted(p.name for p in (REPO / "pipeline").iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file())
    assert top == sorted(["__init__.py", "__main__.py", *ORDER])


@pytest.mark.parametrize(
    ("source", "package", "expected"),
    [
        ("from pipeline.cli.parsers import suggest\n", "model", "imports the command line"),
        ("import pipeline.evaluation.score\n", "training", "imports the later stage"),
        ("from pipeline.data.store import x\n", "utils", "imports the later stage"),
        ("from pipeline.inference import parts\n", "transforms", "pipeline.utils only"),
        ("from pipeline.training.engine import Trainer\n", "evaluation", None),
    ],
)
def test_the_rule_catches_a_wrong_import(source: str, package: str, expected: str | None) -> None:
    bad = _violations(source, "probe.py", package)
    assert (expected in "\n".join(bad)) if expected else not bad, bad
