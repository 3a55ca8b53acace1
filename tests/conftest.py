import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/mnist_data.py for every test folder
# One intra-op thread: the tests are many small ops, where threads cost more than they give.
torch.set_num_threads(1)

# torch.ao.quantization announces its own removal on every prepare/convert call. Only the tests that
# exercise the torch.ao flow on purpose hide that notice; every other DeprecationWarning shows.
_TORCH_AO_FLOW = ("integrations/torch_ao/", "integrations/test_adapter_contract.py", "integrations/test_transformers.py",
                  "examples/", "test_readme.py",
                  "test_reliability.py")


def pytest_collection_modifyitems(items):
    import pytest

    for item in items:
        path = item.path.as_posix()
        if any(part in path for part in _TORCH_AO_FLOW):
            item.add_marker(pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning"))
