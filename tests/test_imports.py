"""Layering: imports go one way (nn -> ops -> kernels -> quant.format / backend) and sit at module
level in the runtime's hot files, not inside functions that run per layer and token."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tinyq")
PENDING = set()
HOT = ["ops/attention.py", "ops/norm.py", "models/llama.py"] + [
    f"kernels/{n}" for n in sorted(os.listdir(os.path.join(ROOT, "kernels"))) if n.endswith(".py")
]


def _imports(path):
    """``(module imported, inside a function?)`` for every tinyq import of a file."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("tinyq"):
                found.append((child.module, in_function))
            elif isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names if a.name.startswith("tinyq"))
            visit(child, nested)

    visit(tree, False)
    return found


@pytest.mark.parametrize("path", [p for p in HOT if p not in PENDING])
def test_no_function_level_tinyq_imports(path):
    inside = [m for m, in_function in _imports(path) if in_function]
    assert not inside, f"tinyq/{path} imports {inside} inside functions"


@pytest.mark.parametrize("path", [p for p in HOT if p.startswith("kernels/") and p not in PENDING])
def test_kernels_import_only_kernels_format_backend(path):
    allowed = ("tinyq.kernels", "tinyq.quant.format", "tinyq.quant.int8_format", "tinyq.backend")
    bad = [m for m, _ in _imports(path) if not m.startswith(allowed)]
    assert not bad, f"tinyq/{path} imports {bad}: kernels must not depend on ops, nn or models"
