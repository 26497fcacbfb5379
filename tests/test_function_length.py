"""No function in amp_search/ is longer than MAX_LINES (issue 10: one idea per function).

Long functions are where a newcomer gets lost and where merges collide; split one into steps
(see run_search, refine_front, MixedPrecisionRewriter.apply) rather than raise the limit.
"""

from __future__ import annotations

import ast
from pathlib import Path

import amp_search

MAX_LINES = 120


def test_no_function_is_longer_than_the_limit():
    root = Path(amp_search.__file__).parent
    long = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                n = (node.end_lineno or node.lineno) - start + 1
                if n > MAX_LINES:
                    long.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({n})")
    assert not long, f"functions over {MAX_LINES} lines: " + "; ".join(long)
