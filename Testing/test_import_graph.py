"""The engine's modules import each other without a cycle: the graph of the imports that run when a module is loaded
(module level, class bodies and module-level if/try included; ``if TYPE_CHECKING:`` blocks excluded), and also with the
imports inside functions, read from the source of every module of GMSSegmentLib (subpackages included) with ast."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "GMSSegment" / "GMSSegmentLib"
PACKAGE = "GMSSegmentLib"


def _module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING"
                                         or getattr(test, "attr", None) == "TYPE_CHECKING")


def _load_time_imports(tree: ast.Module, functions: bool = False):
    """The Import / ImportFrom nodes that run when the module is loaded (``functions``: and those inside functions,
    which run when the function is first called)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if _is_type_checking(node) or (
                not functions and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def import_graph(functions: bool = False) -> dict[str, set[str]]:
    """module -> the engine modules it imports at load time (``functions``: or in a function; ``from . import x``
    counts as module x when x is one, else as the package itself)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in _load_time_imports(ast.parse(path.read_text(encoding="utf-8")), functions):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets |= {f"{module}.{a.name}" if f"{module}.{a.name}" in files else module for a in node.names}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v):
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_engine_modules_import_without_a_cycle():
    graph = import_graph()
    assert "GMSSegmentLib.train" in graph and "GMSSegmentLib.data" in graph["GMSSegmentLib.train"]  # it reads them
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_engine_modules_import_without_a_cycle_also_through_function_local_imports():
    graph = import_graph(functions=True)
    assert "GMSSegmentLib.train" in graph["GMSSegmentLib.cli"]  # cli imports train inside cmd_train: it reads those
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
