"""Run every ```python block of one Markdown page, in order, in one namespace (used by test_docs.py).

A block whose first line is ``# given: a, b`` gets those names defined first, from GIVENS:
the parts a page leaves to the reader (a model, its input). A ```text block right after a
python block (blank lines between at most) is what that block prints with the native engine:
the runner compares it line by line, leaving out a decimal that ends a line (a time), unless
the environment turns the native engine off (nothing is pooled then, and the figures are 0).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import traceback
from pathlib import Path

BLOCK = re.compile(r"^```python\n(.*?)^```\n(?:\s*\n)*(?:```text\n(.*?)^```)?", re.S | re.M)
TIME = re.compile(r"\d+\.\d+\s*$")
GIVEN = re.compile(r"^# given: ([\w, ]+)")
GIVENS = {
    "model": (
        "import torch\n"
        "model = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(64, 4, 256, batch_first=True), 2,"
        " enable_nested_tensor=False).eval()"
    ),
    "x": "import torch\nx = torch.randn(4, 1024, 64)",
}


def blocks(page: Path) -> list[str]:
    return [code for code, _ in BLOCK.findall(page.read_text())]


def _lines(text: str) -> list[str]:
    return [TIME.sub("", line).rstrip() for line in text.strip().splitlines()]


def _native() -> bool:
    return os.environ.get("POOLSCOPE_ENGINE", "") != "passthrough" and os.environ.get(
        "POOLSCOPE_DISABLE", "").strip().lower() not in ("1", "true", "yes", "on")


def run(page: Path) -> int:
    namespace: dict = {"__name__": "__docs__"}
    compare = _native()
    for i, (code, shown) in enumerate(BLOCK.findall(page.read_text()), 1):
        given = GIVEN.match(code)
        if given:
            for name in (n.strip() for n in given.group(1).split(",")):
                exec(GIVENS[name], namespace)
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed) if shown else contextlib.nullcontext():
                exec(compile(code, f"{page.name} block {i}", "exec"), namespace)
        except BaseException:
            print(f"{page}: python block {i} failed:\n{code}", file=sys.stderr)
            traceback.print_exc()
            return 1
        if shown and compare and _lines(printed.getvalue()) != _lines(shown):
            print(f"{page}: python block {i} printed\n{printed.getvalue()}\nbut the page shows\n{shown}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1])))
