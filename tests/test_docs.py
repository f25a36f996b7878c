"""Every Python block of the README and of docs/ runs as written (see tools/docs_runner.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tools.docs_runner import blocks
from helpers import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
WITH_CODE = [p for p in PAGES if blocks(p)]


@pytest.mark.parametrize("page", WITH_CODE, ids=[p.name for p in WITH_CODE])
def test_python_blocks_run(page, tmp_path):
    from conftest import _OLD_TORCH_NEW_PYTHON

    if _OLD_TORCH_NEW_PYTHON and "torch.compile" in page.read_text():
        pytest.skip("torch < 2.6 has no torch.compile on Python 3.13, and this page compiles")
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("tools") / "docs_runner.py"), str(page)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]


def test_every_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, page.name
