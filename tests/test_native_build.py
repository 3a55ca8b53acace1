"""The package build compiles the native ops where a C++ compiler exists (`make venv` builds them)."""
import shutil

import pytest
import torch

from idkm_plugin import native


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler here")
def test_native_ops_are_built_and_registered():
    assert native.available(), "idkm_plugin._C was not built: reinstall with `pip install --no-build-isolation -e .`"
    for op in ("lut_linear", "huffman_encode", "huffman_decode"):
        assert native.has_op(op), op
        assert hasattr(torch.ops.idkm_plugin, op)
