"""Every ```python block of the README runs as written, top to bottom in one namespace.

Fragments that need the reader's own model or data are fenced as ```py and only shown.
"""
import os
import re

import pytest
import torch

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    pytest.importorskip("torchao")
    pytest.importorskip("brevitas")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    with open(README) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) >= 5
    namespace = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, README, "exec"), namespace)
