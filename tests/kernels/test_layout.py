"""The kernel room's import direction: utils <- the kernel modules (which never import each other) <- losses."""

from __future__ import annotations

import ast
from pathlib import Path

import f2llm.kernels

KERNELS = Path(f2llm.kernels.__file__).resolve().parent


def kernel_imports(module: str) -> set[str]:
    """The f2llm.kernels modules that ``module`` imports, at any depth of its source."""
    found = set()
    for node in ast.walk(ast.parse((KERNELS / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "f2llm.kernels":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("f2llm.kernels."):
            found.add(node.module.removeprefix("f2llm.kernels."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("f2llm.kernels.") for a in node.names if a.name.startswith("f2llm.kernels.")}
    return found


def test_imports_run_one_way() -> None:
    assert kernel_imports("utils") == set()
    for leaf in ("contrastive", "matryoshka", "pooling"):
        assert kernel_imports(leaf) == {"utils"}, leaf
    assert kernel_imports("losses") == {"contrastive", "matryoshka", "utils"}


def test_package_exports_the_public_ops() -> None:
    assert f2llm.kernels.__all__, "f2llm.kernels exports nothing"
    for name in f2llm.kernels.__all__:
        assert callable(getattr(f2llm.kernels, name)), name
    assert f2llm.kernels.infonce.__module__ == "f2llm.kernels.losses"
