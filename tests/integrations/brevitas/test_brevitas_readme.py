"""The Brevitas README section's snippets run as written."""
import os
import re

import pytest
import torch

pytest.importorskip("brevitas")

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "..", "docs", "readme_brevitas.md")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_readme_snippets_run():
    with open(DOC) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, DOC, "exec"), {"__name__": "readme_brevitas"})
