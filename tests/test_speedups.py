"""The speed wing's decision table and its one call: what ``null`` turns on where, ``true`` where a
speed-up cannot run is an error naming it, ``speedups=off`` applies nothing, and only the loop
imports the wing."""

from __future__ import annotations

import ast
from types import SimpleNamespace

import pytest
import torch

from engine import speedups
from engine.config import SpeedupsConfig, validate
from engine.errors import EngineError
from tests.conftest import ROOT, TINY
from tests.test_model import tiny


def _apply(make_cfg, *overrides, device="cpu", processes=1, training=True):
    config = validate(make_cfg(*TINY, *overrides))
    backend = SimpleNamespace(device=torch.device(device), num_processes=processes)
    return speedups.apply(tiny(), backend, config, training=training)


def test_auto_turns_on_every_row_for_single_process_cpu_training(make_cfg):
    assert _apply(make_cfg) == ["fast_dropout", "sparse_embedding_grad", "first_token_last_layer"]
    assert _apply(make_cfg, "speedups=off") == []
    assert _apply(make_cfg, "speedups=off", "speedups.sparse_embedding_grad=true") == ["sparse_embedding_grad"]


def test_each_row_steps_aside_where_it_does_not_apply(make_cfg):
    assert _apply(make_cfg, device="cuda") == []  # CPU-only rows on a GPU
    assert _apply(make_cfg, processes=2) == ["fast_dropout", "first_token_last_layer"]  # DDP wants dense grads
    assert _apply(make_cfg, training=False) == ["first_token_last_layer"]  # evaluation-only run
    config = validate(make_cfg(*TINY))
    backend = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    frozen = tiny()
    frozen.hf_model.get_input_embeddings().weight.requires_grad_(False)
    assert "sparse_embedding_grad" not in speedups.apply(frozen, backend, config)


def test_true_where_a_row_cannot_run_is_an_error_naming_it(make_cfg):
    with pytest.raises(EngineError, match=r"speedups.sparse_embedding_grad=true: 2 processes: DDP all-reduces"):
        _apply(make_cfg, "speedups.sparse_embedding_grad=true", processes=2)
    with pytest.raises(EngineError, match=r"speedups.fast_dropout=true: cuda: "):
        _apply(make_cfg, "speedups.fast_dropout=true", device="cuda")
    distil = SimpleNamespace(
        hf_model=torch.nn.Linear(2, 2), device=torch.device("cpu"), num_processes=1
    )  # no BERT-style encoder at all
    with pytest.raises(EngineError, match=r"speedups.first_token_last_layer=true: Linear is not a classifier"):
        speedups.apply(
            distil, distil, validate(make_cfg(*TINY, "speedups=off", "speedups.first_token_last_layer=true"))
        )


def test_every_row_has_a_switch_and_a_measured_figure():
    from engine.config import SpeedupsConfig

    switches = set(SpeedupsConfig.__dataclass_fields__) - {"compile", "compile_backend", "compile_mode"}
    assert {row.name for row in speedups.TABLE} == switches
    assert all(row.applies and row.measured for row in speedups.TABLE)


def _engine_imports(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("engine")}


def test_only_the_loop_reaches_the_wing_and_no_import_circles():
    engine = ROOT / "engine"
    for path in engine.glob("*.py"):
        wing = {n for n in _engine_imports(path) if n.startswith("engine.speedups")}
        assert not wing or path.name == "loop.py", f"{path.name} imports {wing}"
    # the module graph of engine/ (speed wing included) has no cycle
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for p in engine.rglob("*.py")
        if "metric_modules" not in p.parts
    }
    graph = {m: {n for n in _engine_imports(p) if n in modules and n != m} for m, p in modules.items()}
    graph = {m: {n for n in deps if not m.startswith(n + ".")} for m, deps in graph.items()}  # a package's own init
    state: dict[str, int] = {}

    def visit(module, path):
        state[module] = 1
        for dependency in graph[module]:
            assert state.get(dependency) != 1, "import circle: " + " -> ".join([*path, dependency])
            if dependency not in state:
                visit(dependency, [*path, dependency])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_no_compiled_code_in_the_engine():
    assert not [p for p in (ROOT / "engine").rglob("*") if p.suffix in (".c", ".h", ".cpp", ".so")]
    for path in (ROOT / "engine").rglob("*.py"):
        assert "ctypes" not in path.read_text(), path


def test_the_engine_keeps_its_plain_shape():
    """Issue 26's bounds: the engine's Python, the wing, ``fit``, the README, a trainer config without speed keys."""

    def lines(paths):
        return sum(len(p.read_text().splitlines()) for p in paths)

    assert lines((ROOT / "engine").rglob("*.py")) <= 5500
    assert lines((ROOT / "engine" / "speedups").rglob("*.py")) <= 1000
    loop = ast.parse((ROOT / "engine" / "loop.py").read_text())
    (fit,) = [node for node in loop.body if isinstance(node, ast.FunctionDef) and node.name == "fit"]
    assert fit.end_lineno - fit.lineno + 1 <= 150
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
    trainer_keys = (ROOT / "conf" / "trainer" / "default.yaml").read_text()
    assert not [f for f in SpeedupsConfig.__dataclass_fields__ if f"{f}:" in trainer_keys]
