"""The package's import graph: no cycle between rmcore's modules, also none through an import inside a function;
imports inside functions only for optional dependencies, each saying why; the scripts never import each other."""
import ast
from pathlib import Path

from helpers.runs import REPO

OPTIONAL = ("wandb", "matplotlib", "gguf", "pyarrow", "peft", "transformers", "profanity_check")
SCRIPTS = ("train", "raft", "ppo", "eval")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(f): f for f in sorted((REPO / "rmcore").rglob("*.py"))}


def imports(path: Path):
    """(imported module, line, inside a function?) for every import statement of the file."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from rmcore.config import sweep` imports the module rmcore.config.sweep
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            continue
        scope = node
        while scope in parents and not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
            scope = parents[scope]
        for name in names:
            yield name, node.lineno, isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef))


def rmcore_module(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def test_no_import_cycle_between_rmcore_modules():
    graph = {m: {rmcore_module(n) for n, _, _ in imports(f) if n.startswith("rmcore")} - {None, m}
             for m, f in MODULES.items()}
    assert len(graph) > 30 and sum(map(len, graph.values())) > 80  # the graph was read, not found empty
    done, path = set(), []

    def visit(m):  # depth-first; a module met again while on the current path closes a cycle
        if m in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(m):] + [m])}")
        if m in done:
            return
        path.append(m)
        for n in sorted(graph[m]):
            visit(n)
        path.pop()
        done.add(m)

    for m in graph:
        visit(m)


def test_imports_inside_functions_are_optional_dependencies_and_say_why():
    files = [*MODULES.values(), *(REPO / f"{s}.py" for s in SCRIPTS)]
    inner = [(f, name, line) for f in files for name, line, in_function in imports(f) if in_function]
    assert inner  # the optional dependencies are imported where they are needed
    for f, name, line in inner:
        where = f"{f.relative_to(REPO)}:{line}: import {name}"
        assert name.split(".")[0] in OPTIONAL, f"{where}: only optional dependencies are imported inside a function"
        text = f.read_text().splitlines()
        said = "#" in text[line - 1] or any("import" in x and "#" in x for x in text[max(0, line - 3):line])
        assert said, f"{where}: say why in a comment"


def test_scripts_never_import_each_other():
    for script in SCRIPTS:
        imported = {name.split(".")[0] for name, _, _ in imports(REPO / f"{script}.py")}
        assert not imported & (set(SCRIPTS) - {script}), script
