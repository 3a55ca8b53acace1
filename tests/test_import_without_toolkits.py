"""`import idkm_plugin` and the core work when torchao and Brevitas cannot be imported.

Each check runs in a fresh interpreter whose sys.meta_path refuses the toolkits, as on a machine
where they are not installed; the integrations then fail with an install hint.
"""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys

    class BlockToolkits(importlib.abc.MetaPathFinder):
        blocked = ("torchao", "brevitas")

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.blocked:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, BlockToolkits())
""")


SCRIPT = """
import torch
from torch import nn
import idkm_plugin
from idkm_plugin import ClusterConfig, ModelConfig, soft_kmeans
from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.layers import palettize_module
import idkm_plugin.nn
from idkm_plugin.export import size_report
import idkm_plugin.integrations

torch.manual_seed(0)
layer = nn.Linear(16, 4)
clusterer = WeightClusterer(ClusterConfig(bits=2, max_iter=5)).train()
clusterer(layer.weight).sum().backward()
clusterer.eval()
deployed = palettize_module(layer, clusterer)
assert type(deployed) is nn.Linear and isinstance(deployed.weight, idkm_plugin.nn.PalettizedTensor)
x = torch.randn(3, 16)
assert torch.equal(deployed(x), torch.nn.functional.linear(x, clusterer(layer.weight), layer.bias))
assert size_report(nn.Sequential(deployed)).layers[0].bits == 2
assert not any(m.split(".")[0] in ("torchao", "brevitas") for m in sys.modules)
print("core ok")

for toolkit in ("torchao", "brevitas"):
    try:
        __import__(f"idkm_plugin.integrations.{toolkit}")
    except ImportError as err:
        print(f"{toolkit} ImportError: {err}")
    else:
        print(f"{toolkit} imported although blocked")
"""


@pytest.fixture(scope="module")
def blocked_run() -> subprocess.CompletedProcess:
    """One fresh interpreter (importing torch is the slow part) for all the checks."""
    return subprocess.run([sys.executable, "-c", BLOCKER + SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_core_works_without_torchao_and_brevitas(blocked_run):
    assert blocked_run.returncode == 0, blocked_run.stderr
    assert "core ok" in blocked_run.stdout.splitlines()


@pytest.mark.parametrize("toolkit", ["torchao", "brevitas"])
def test_integration_without_its_toolkit_raises_install_hint(blocked_run, toolkit):
    assert blocked_run.returncode == 0, blocked_run.stderr
    assert f"{toolkit} ImportError: idkm_plugin.integrations.{toolkit} needs" in blocked_run.stdout
    assert f"idkm-plugin[{toolkit}]" in blocked_run.stdout
