"""Every ```python block of the README and of each docs/*.md page runs as written.

Each file runs top to bottom in its own namespace, in a temporary working directory. Fragments that need the
reader's own model or data are fenced as ```py and only shown.
"""
import glob
import os
import re

import pytest
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)


def python_blocks(path: str) -> list[str]:
    with open(path) as f:
        return BLOCK.findall(f.read())


def test_pages_have_runnable_examples():
    """The README and the reference pages keep code a reader can run (not only shown fragments)."""
    assert len(python_blocks(PAGES[0])) >= 3
    for page in ("configuration.md", "flows.md", "deployment.md"):
        assert python_blocks(os.path.join(ROOT, "docs", page)), page


@pytest.mark.parametrize("path", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_python_blocks_run(path, tmp_path, monkeypatch):
    blocks = python_blocks(path)
    if not blocks:
        pytest.skip(f"{os.path.basename(path)} has no ```python block")
    pytest.importorskip("torchao")
    pytest.importorskip("brevitas")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {"__name__": os.path.basename(path)}
    for block in blocks:
        exec(compile(block, path, "exec"), namespace)
