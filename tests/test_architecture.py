"""The shape of the code: a layered import graph without cycles, and typed recipe steps.

The import graph is read from the sources (every import statement, also those inside functions), with
the edges Python adds by itself: importing `a.b.c` runs the packages `a.b` first. A cycle anywhere, an
import reaching a higher layer, or a module no layer claims fails here with the offending edges.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"dmquant": "dmquant", "dmquant.pipelines": "pipelines", "dmquant.calibration": "calibration",
            "dmquant.eval": "eval"}

# Bottom to top: a module may import its own layer (without cycles) and the layers below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundations", ("dmquant.atomic", "dmquant.memory", "dmquant.formats", "dmquant.granularity", "dmquant.primitives",
                     "dmquant.packing", "dmquant.observers", "dmquant.step_configs",
                     "dmquant.config", "dmquant.filters", "dmquant.families", "dmquant.components",
                     "dmquant.timestep", "dmquant.orthogonal", "dmquant.provenance", "dmquant.recipes", "dmquant.plans")),
    ("kernels", ("dmquant.kernels",)),
    ("modules", ("dmquant.nn",)),
    ("state", ("dmquant.state", "dmquant.observe", "dmquant.payload")),
    ("methods", ("dmquant.transforms", "dmquant.algorithms", "dmquant.finetune")),
    ("steps", ("dmquant.steps",)),
    ("apply", ("dmquant.apply", "dmquant.serialization", "dmquant.report")),
    ("diffusers", ("dmquant.pipelines",)),
    ("calibration", ("dmquant.calibration",)),
    ("mixed", ("dmquant.mixed",)),
    ("api", ("dmquant.api",)),
    ("eval", ("dmquant.eval",)),
    ("apps", ("dmquant.cli", "dmquant.demo")),
]


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The longest known module that `name` (a module or a name inside one) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _targets(module: str, path: Path, node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = module.split(".")[: None if path.name == "__init__.py" else -1]
        if node.level:
            base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        return [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names]
    return []


def import_graph() -> dict[str, set[str]]:
    """{module: modules it makes Python run}, within dmquant (the root package itself excluded)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            for target in _targets(module, path, node):
                owner = _owner(target)
                if owner is None:
                    continue
                graph[module].add(owner)
                parent = owner.rpartition(".")[0]  # importing a.b.c runs a.b's __init__ first
                while parent and parent != "dmquant":
                    if not module.startswith(parent + "."):
                        graph[module].add(parent)
                    parent = parent.rpartition(".")[0]
        graph[module].discard(module)
    return graph


def _layer(module: str) -> int | None:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    cycles = _cycles(graph)
    detail = [f"{c}: " + ", ".join(f"{a}->{b}" for a in c for b in graph[a] if b in c) for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(detail)


def test_every_import_goes_down_the_layers():
    graph = import_graph()
    unclaimed = sorted(m for m in graph if m != "dmquant" and _layer(m) is None)
    assert not unclaimed, f"modules no layer claims (add them to LAYERS): {unclaimed}"
    upward = [f"{a} ({LAYERS[_layer(a)][0]}) -> {b} ({LAYERS[_layer(b)][0]})"
              for a in graph if a != "dmquant" for b in graph[a]
              if b != "dmquant" and _layer(b) > _layer(a)]
    assert not upward, "imports reaching a higher layer:\n" + "\n".join(sorted(upward))
    top = max(_layer(b) for b in graph["dmquant"])  # the public API sits on the layers it exports
    into_root = sorted(a for a in graph if a != "dmquant" and "dmquant" in graph[a] and _layer(a) <= top)
    assert not into_root, f"modules under the public API importing the top-level package: {into_root}"


def test_kernels_do_not_know_the_layer_classes():
    graph = import_graph()
    assert not [b for a in graph if a.startswith("dmquant.kernels") for b in graph[a] if b.startswith("dmquant.nn")]


def test_the_graph_reader_sees_deferred_and_relative_imports():
    """The checks above are only as good as the reader: it must see an import inside a function, a
    relative import, and the package a submodule import runs."""
    graph = import_graph()
    assert "dmquant.calibration" in graph["dmquant.api"]  # deferred, absolute-from-relative
    assert {"dmquant.nn.qmodule", "dmquant.nn"} <= graph["dmquant.transforms.attach"]
    assert "dmquant.config" in graph["dmquant.nn.quantizer"]


def test_library_code_never_hides_an_import_or_sets_the_environment():
    setting = re.compile(r"os\.environ\[[^\]]+\]\s*=[^=]|os\.environ\.(setdefault|update)\(|os\.putenv\(")
    hidden = [m for m, p in MODULES.items() if re.search(r"import_module\(\s*[\"']dmquant", p.read_text())]
    setters = [m for m, p in MODULES.items() if setting.search(p.read_text())]
    assert not hidden, f"dmquant imports hidden from the import graph: {hidden}"
    assert not setters, f"library modules setting environment variables: {setters}"


# -- typed recipe steps --------------------------------------------------------------------------------
def test_every_step_function_takes_exactly_its_config():
    from dmquant.step_configs import STEP_CONFIGS, DistillConfig
    from dmquant.steps import STEPS

    assert STEPS.keys() == STEP_CONFIGS.keys()
    for name, fn in STEPS.items():
        params = list(inspect.signature(fn).parameters.values())[2:]  # after (modules, run)
        explicit = {p.name: p.default for p in params if p.kind is not p.VAR_KEYWORD}
        fields = {f.name: f.default for f in dataclasses.fields(STEP_CONFIGS[name])}
        if any(p.kind is p.VAR_KEYWORD for p in params):  # the fine-tuning steps pass the loop on
            loop = {f.name for f in dataclasses.fields(DistillConfig)}
            assert set(fields) == set(explicit) | loop, name
            fields = {k: v for k, v in fields.items() if k not in loop}
        assert {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in explicit.items()} == \
            {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in fields.items()}, name


@pytest.mark.parametrize("steps,error,match", [
    ([{"name": "gptq", "args": {"blocksize": 64}}], ValueError, r"unknown argument\(s\) \['blocksize'\].*block_size"),
    ([{"name": "gptq", "args": {"block_size": "64"}}], TypeError, "block_size: expected int"),
    ([{"name": "gptq", "args": {"act_order": 1}}], TypeError, "act_order: expected bool"),
    ([{"name": "gtpq"}], ValueError, "unknown recipe step 'gtpq'"),
    ([{"name": "svd", "args": {"ranks": {"attn": "8"}}}], TypeError, "ranks.attn: expected int"),
    ([{"name": "efficientdm", "args": {"iters": -1}}], ValueError, "iters >= 0"),
    ([{"name": "ranges", "args": {"alpha": 0.5}}], ValueError, "valid: none"),
])
def test_a_bad_step_argument_fails_when_the_recipe_is_built(steps, error, match):
    from dmquant.config import Recipe

    t0 = time.perf_counter()
    with pytest.raises(error, match=match):
        Recipe.from_dict({"name": "r", "weight": {"format": "int4"}, "steps": steps})
    assert time.perf_counter() - t0 < 1.0


def test_step_arguments_are_normalised_and_keep_the_recipe_hash():
    from dmquant.config import Recipe, Step

    step = Step("adaround", {"beta": [20, 2], "iters": 10})
    assert step.args == {"beta": (20.0, 2.0), "iters": 10} and step.config.lr == 1e-2 and step.config.iters == 10
    assert Step("smoothquant", {"alpha": 1}).config.alpha == 1.0
    r = Recipe.from_dict({"name": "r", "weight": {"format": "int4"}, "steps": [{"name": "gptq"}]})
    assert r.to_dict()["steps"] == [{"name": "gptq", "args": {}}]  # defaults are not written into the recipe
    assert Recipe.from_dict(r.to_dict()) == r


def test_step_outcomes_are_kept_in_the_state_and_the_plan_is_read_from_the_modules():
    import torch

    import dmquant
    from dmquant.config import Recipe
    from dmquant.state import plan_of
    from dmquant.step_configs import GPTQConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    x = torch.randn(64, 32)
    recipe = Recipe.from_dict({"name": "r", "weight": {"format": "int4"}, "exclude": [],
                               "steps": [{"name": "gptq", "args": {"block_size": 16}}, {"name": "svd", "args": {"rank": 4}}]})
    dmquant.quantize(model, recipe, calibration=lambda m: m(x))
    state = model.dmquant_state
    assert [o.name for o in state.steps] == ["gptq", "svd"]
    assert state.steps[0].config == GPTQConfig(block_size=16) and set(state.steps[0].result) == {"0.0", "0.2"}
    assert state.plan == plan_of(model) and state.plan["0"].lowrank_rank == 4  # svd's branch, read back
