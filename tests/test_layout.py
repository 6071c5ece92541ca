"""The package's shape, as the README's architecture section draws it: layers that import one way, small
modules, keyword calls, a test file per module (tests/test_<module>.py)."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "usi"
# Top to bottom: a module may import from its own layer and the layers before it, never after.
LAYERS = ["errors", "recipe", "runtime", "data", "distill", "models", "evaluation", "training", "studies", "cli"]
# The one edge against the order: evaluation reads last.pt (usi eval, usi export) through the checkpoint's
# format, which imports nothing of training.
ALLOWED = {("evaluation", "usi.training.checkpoint")}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "usi"


def imports(path: Path) -> set[str]:
    """The usi modules `path` imports: `from usi.training import checkpoint` is usi.training.checkpoint (the
    package's empty __init__ aside), `from usi.recipe import load` is usi.recipe."""
    known = modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("usi"):
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(known)
            found |= submodules or {node.module}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("usi")}
    return found


def test_layers_import_one_way():
    known = modules()
    assert {layer(m) for m in known} - {"usi", "__main__"} <= set(LAYERS)
    for module, path in known.items():
        if layer(module) in ("usi", "__main__"):
            continue
        mine = LAYERS.index(layer(module))
        for target in imports(path) & set(known):
            theirs = layer(target)
            if theirs == "usi" or (layer(module), target) in ALLOWED:
                continue
            assert LAYERS.index(theirs) <= mine, f"{module} imports {target}: {theirs} comes after {layer(module)}"


def test_no_import_circle():
    known = modules()
    graph = {m: imports(p) & set(known) for m, p in known.items()}

    def reaches(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo += graph.get(node, [])
        return seen

    circles = [m for m in graph if m in reaches(m)]
    assert not circles, f"modules on an import circle: {circles}"


def test_no_module_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_no_call_passes_more_than_four_plain_values_by_position():
    # a matrix's six coefficients and the standard library's own signature are values of one kind, in order
    exempt = {"_matrix", "log.makeRecord"}
    crowded = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) not in exempt:
                if len([a for a in node.args if not isinstance(a, ast.Starred)]) > 4:
                    crowded.append(f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(node.func)}")
    assert not crowded, crowded


def test_tools_import_the_installed_package():
    for path in (REPO / "tools").glob("*.py"):
        assert "sys.path" not in path.read_text(), f"{path.name} edits sys.path"


def test_every_module_has_a_test_file():
    tests = REPO / "tests"
    exempt = {"__init__", "__main__"}
    stems = [p.stem for p in PACKAGE.rglob("*.py") if p.stem not in exempt]
    assert len(stems) == len(set(stems)), "module names in usi/ must be unique by file name"
    missing = sorted(f"tests/test_{stem}.py" for stem in stems if not (tests / f"test_{stem}.py").is_file())
    assert not missing, f"modules without a test file: {missing}"
