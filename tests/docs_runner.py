"""Run every ```python block of one Markdown page, in order, in one namespace (used by test_docs.py).

A block whose first line is ``# given: a, b`` gets those names defined first, from GIVENS:
the parts a page leaves to the reader (a model, its input).
"""

from __future__ import annotations

import re
import sys
import traceback
from pathlib import Path

BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
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
    return BLOCK.findall(page.read_text())


def run(page: Path) -> int:
    namespace: dict = {"__name__": "__docs__"}
    for i, code in enumerate(blocks(page), 1):
        given = GIVEN.match(code)
        if given:
            for name in (n.strip() for n in given.group(1).split(",")):
                exec(GIVENS[name], namespace)
        try:
            exec(compile(code, f"{page.name} block {i}", "exec"), namespace)
        except BaseException:
            print(f"{page}: python block {i} failed:\n{code}", file=sys.stderr)
            traceback.print_exc()
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1])))
