import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/mnist_data.py for every test folder
# One intra-op thread: the tests are many small ops, where threads cost more than they give.
torch.set_num_threads(1)
