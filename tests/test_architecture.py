"""Package structure: no import cycles, every CLI in filo/cli/, each flag defined once."""

from __future__ import annotations

import ast
import dataclasses
import importlib
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "filo"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":`` -- runs only as the script ``__main__``, not as the module."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """filo modules imported anywhere in ``path`` (module level and inside functions), except
    in a ``__main__`` guard."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    stack = [n for n in tree.body if not _is_main_guard(n)]
    while stack:
        node = stack.pop()
        if _is_main_guard(node):
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            stack.extend(ast.iter_child_nodes(node))
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != me:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts]
    modules = {_module_name(p) for p in files}
    graph = {}
    for p in files:
        # importing a submodule imports its parent packages too, but a package's __init__ is not
        # a dependency cycle of its own submodules: keep only what the file itself names
        graph[_module_name(p)] = _imports(p, modules)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "filo.pipeline" in graph and "filo.evaluation.runner" in graph["filo.cli.test"]
    # package __init__ files that re-export submodules are edges too; a cycle through them
    # would still break a fresh import, so nothing is exempt
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


CLIS = {
    "test": "filo.cli.test", "detect": "filo.cli.detect", "predict": "filo.cli.predict",
    "train": "filo.cli.train", "demo": "filo.cli.demo", "filo": "filo.cli.main",
    "data": "filo.cli.data", "convert": "filo.cli.convert", "memory": "filo.cli.memory",
}


@pytest.mark.parametrize("module", sorted(CLIS.values()))
def test_every_entry_point_lives_in_filo_cli(module):
    mod = importlib.import_module(module)
    assert callable(mod.main)


@pytest.mark.parametrize("old,new", [("filo.detect", "filo.cli.detect"),
                                     ("filo.predict", "filo.cli.predict"),
                                     ("filo.data.__main__", "filo.cli.data"),
                                     ("filo.detector.__main__", "filo.cli.convert"),
                                     ("filo.__main__", "filo.cli.main"),
                                     ("filo.memory.__main__", "filo.cli.memory")])
def test_old_entry_points_still_work(old, new):
    assert importlib.import_module(old).main is importlib.import_module(new).main


def _flags(parser) -> dict[str, tuple[tuple[str, ...], object]]:
    """dest -> (option strings, default) of every optional flag of a parser."""
    out = {}
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            out[action.dest] = (tuple(sorted(action.option_strings)), action.default)
    return out


def _parsers():
    from filo.cli import detect, predict, test, train

    return {"test": test.build_parser(), "detect": detect.build_parser(),
            "predict": predict.build_parser(), "train": train.build_parser()}


# a training batch is not an inference batch: train.py keeps the research code's 1
TRAINING_ONLY_MEANING = {("train", "batch_size")}


def test_shared_flags_have_one_name_and_one_default_everywhere():
    flags = {name: _flags(p) for name, p in _parsers().items()}
    seen: dict[str, tuple[str, tuple[tuple[str, ...], object]]] = {}
    for cli, table in flags.items():
        for dest, spec in table.items():
            if (cli, dest) in TRAINING_ONLY_MEANING:
                continue
            if dest in seen:
                first_cli, first = seen[dest]
                assert spec == first, f"--{dest}: {cli} {spec} vs {first_cli} {first}"
            else:
                seen[dest] = (cli, spec)
    # the help text of every CLI parses (no argparse formatting error)
    for parser in _parsers().values():
        assert "--" in parser.format_help()


def test_every_pipeline_flag_is_offered_by_test_and_predict():
    from filo.evaluation.runner import RunConfig
    from filo.pipeline import PipelineConfig
    from filo.settings import flag_fields

    parsers = _parsers()
    names = {f.name for f in flag_fields(PipelineConfig)}
    for cli in ("test", "predict"):
        assert names <= set(_flags(parsers[cli])), cli
    run_names = {f.name for f in flag_fields(RunConfig)}
    assert run_names <= set(_flags(parsers["test"])) | {"save_coco", "pixel_metrics"}
    # every settings field is a flag with help text
    for cls in (PipelineConfig, RunConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata["flag"]["help"], f.name


def test_renamed_flag_keeps_its_old_name():
    from filo.cli.predict import build_parser

    ns = build_parser().parse_args(["--images", "x.png", "--class", "c", "--lift_boxes"])
    assert ns.viz_lift_boxes is True


def _third_party_imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (anywhere in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("library, allowed", [
    ("huggingface_hub", {"filo/hub.py"}),  # downloads only: run time stays offline
    ("fastapi", {"filo/service/app.py"}),  # the batch CLIs never need the service's libraries
    ("uvicorn", {"filo/cli/serve.py"}),
    ("pycocotools", {"filo/evaluation/coco_eval.py"}),
    ("anomalib", {"filo/baselines/backend.py"}),  # optional: trained baselines only
    ("lightning", set()),  # only through anomalib's Engine
    ("onnxruntime", {"filo/deploy/runtimes.py"}),  # deploy bundles: the one runtime module
    ("openvino", {"filo/deploy/runtimes.py"}),
    ("onnx", {"filo/export/writer.py"}),
])
def test_optional_libraries_are_imported_in_one_place(library, allowed):
    users = {str(p.relative_to(PKG.parent)) for p in PKG.rglob("*.py")
             if "__pycache__" not in p.parts and library in _third_party_imports(p)}
    assert users == allowed


def test_the_test_cli_does_not_load_the_service_or_the_hub():
    import subprocess
    import sys

    code = ("import sys, filo.cli.test, filo.cli.detect, filo.cli.predict; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'huggingface_hub', 'filo.hub') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PKG.parent, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def _code_running_loads(source: str) -> list[str]:
    """Calls in ``source`` that can run code stored in a file: ``torch.jit.load`` (and its
    relatives), ``torch.load`` without ``weights_only=True``, ``pickle``'s loaders."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.jit"):
            found += [f"from {node.module} import {a.name}" for a in node.names
                      if a.name in ("load", "_load_for_lite_interpreter")]
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(
            node.value, "id", "")
        if owner in ("jit", "_C") and node.attr in ("load", "_load_for_lite_interpreter",
                                                     "import_ir_module"):
            found.append(f"{owner}.{node.attr} (line {node.lineno})")
        if owner in ("pickle", "_pickle", "dill", "cloudpickle") and node.attr in ("load", "loads"):
            found.append(f"{owner}.{node.attr} (line {node.lineno})")
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load" and getattr(node.func.value, "id", "") == "torch"
                and not any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                            for k in node.keywords)):
            found.append(f"torch.load without weights_only=True (line {node.lineno})")
    return found


def test_no_weight_file_reaches_a_loader_that_runs_code():
    """TorchScript archives are read by filo.script_archive only (docs/design.md §2.1)."""
    caught = _code_running_loads(
        "import torch, pickle\nfrom torch.jit import load\ntorch.jit.load(p)\n"
        "torch._C.import_ir_module(p)\npickle.loads(b)\ntorch.load(p)\n"
        "torch.load(p, weights_only=False)\ntorch.load(p, weights_only=True)\n")
    assert len(caught) == 6, caught
    offenders = {str(p.relative_to(PKG.parent)): hits for p in PKG.rglob("*.py")
                 if "__pycache__" not in p.parts and (hits := _code_running_loads(p.read_text()))}
    assert offenders == {}
