"""The package's shape: its parts stand on floors and import only from floors below (top-level or
inside functions), no import cycle among its modules, imports of its own modules at the top of a
module unless a comment says why not, and the objective's mode is told apart only by the
objectives themselves."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ebft_megatron"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imported_modules(node, modules) -> list[str]:
    """The package modules an import statement names (``from a.b import c``: a.b.c if that is a
    module, else a.b)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in modules]
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        found = [f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in modules]
        return found or ([node.module] if node.module in modules else [])
    return []


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its code."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets.update(_imported_modules(node, modules))
        targets.discard(name)
        graph[name] = {t for t in targets if not name.startswith(t + ".")}  # a package importing its own parts
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 50 and graph["ebft_megatron.training.loop"]
    assert cycles(graph) == []


# The floors, ground first: a part (a folder or a top-level module of the package) imports only
# from parts on floors below its own. The README's tree shows the same floors.
FLOORS = (
    ("errors", "lazy"),  # the base of user errors; lazily exported names
    ("settings",),  # how a settings section is declared and checked
    ("runtime",),  # the device, process groups, pipeline schedule, watchdog: runs what it is given
    ("cli", "block_layout"),  # entry-point behaviour; the strided block layout (who attends to whom)
    ("models",),  # megatron GPT models, attention, LoRA adapters, the FLOP model
    ("checkpoint",),  # checkpoint files and conversion
    ("rollouts", "features"),  # sampling from a policy; the frozen feature network
    ("assets",),  # real models that ship inside packages
    ("data",),  # sources, tokenizers, packing, indexed corpora
    ("objective",),  # EBFT, SFT, RLVR: rewards and losses
    ("config",),  # a run's settings, all sections
    ("evaluation",),  # CE, CFM, downstream tasks, reports
    ("training",),  # the builder and the trainer
    ("train", "evaluate", "generate"),  # the command-line entry points
)


def floor_of(module: str) -> int:
    """The floor of a package module's part (ValueError for a part on no floor)."""
    part = module.split(".")[1] if "." in module else module
    for floor, parts in enumerate(FLOORS):
        if part in parts:
            return floor
    raise ValueError(f"{module}: its part {part!r} stands on no floor; add it to FLOORS")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports between parts that do not point to a lower floor."""
    found = []
    for module, targets in graph.items():
        if module == PACKAGE.name:
            continue
        for target in targets:
            if target != PACKAGE.name and module.split(".")[:2] != target.split(".")[:2] \
                    and floor_of(target) >= floor_of(module):
                found.append(f"{module} -> {target}")
    return sorted(found)


def test_the_floor_check_finds_an_import_that_climbs():
    graph = {"ebft_megatron.models.gpt": {"ebft_megatron.runtime.device", "ebft_megatron.models.layers"},
             "ebft_megatron.runtime.pipeline": {"ebft_megatron.models.gpt"},
             "ebft_megatron.rollouts.sampler": {"ebft_megatron.features.network"}}
    assert upward_imports(graph) == ["ebft_megatron.rollouts.sampler -> ebft_megatron.features.network",
                                     "ebft_megatron.runtime.pipeline -> ebft_megatron.models.gpt"]


def test_every_import_points_down_a_floor():
    graph = import_graph()
    for module in graph:
        if module != PACKAGE.name:
            floor_of(module)
    assert upward_imports(graph) == []


def function_level_imports() -> list[tuple[str, int, str]]:
    """(file, line, the line) of every import of a package module inside a function."""
    modules = _modules()
    found = []
    for name, path in modules.items():
        lines = path.read_text().splitlines()
        for function in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    if _imported_modules(node, modules) or (
                            isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE.name)):
                        found.append((str(path.relative_to(PACKAGE.parent)), node.lineno, lines[node.lineno - 1]))
    return sorted(set(found))


def test_imports_of_the_package_inside_functions_say_why():
    """The package's own modules are imported at the top of a module, where a reader and a tool see
    the dependency; one inside a function carries a comment (on its line or the line above) that
    says why: an optional dependency it pulls in, or what importing it first would cost."""
    unexplained, found = [], function_level_imports()
    for path, line, text in found:
        lines = (PACKAGE.parent / path).read_text().splitlines()
        above = line - 2  # the line above this import and the imports right before it
        while above >= 0 and (not lines[above].strip() or lines[above].strip().startswith(("from ", "import "))) \
                and "#" not in lines[above]:
            above -= 1
        if "#" not in text and not (above >= 0 and lines[above].strip().startswith("#")):
            unexplained.append(f"{path}:{line}: {text.strip()}")
    assert unexplained == []
    assert len(found) <= 18  # this many, each with its reason, when this was written


MODES = {"ebft", "sft", "rlvr"}


def test_only_the_objectives_compare_against_a_mode_name():
    """Comparisons such as ``mode == "sft"`` belong in the objectives' own code; elsewhere the
    trainer asks the objective."""
    places = []
    for name, path in _modules().items():
        if name == "ebft_megatron.objective.objectives":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                constants = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(isinstance(value, str) and value in MODES for value in constants):
                    places.append(f"{name}:{node.lineno}")
    assert places == []
