"""benchmarks/llm_step.py end to end on a tiny random Llama (the SmolLM2 run itself is a benchmark, not a test)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("torchao")

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "llm_step.py")


def test_tiny_run_writes_the_table_and_json(tmp_path):
    stem = tmp_path / "llm_step_tiny"
    subprocess.run([sys.executable, SCRIPT, "--tiny", "--steps", "2", "--batch", "2", "--seq", "16",
                    "--out", str(stem)], check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    results = json.loads(stem.with_suffix(".json").read_text())
    md = stem.with_suffix(".md").read_text()
    for case in ("float", "qat_tensor", "qat_grouped16"):
        r = results[case]
        assert len(r["steps"]) == 2 and r["step_s"] > 0 and r["eval_s"] > 0 and r["peak_rss_mb"] > 0
        assert f"| {case} |" in md
    assert all(s["evals"] == 0 for s in results["float"]["steps"])
    assert all(s["evals"] > 0 for s in results["qat_tensor"]["steps"])  # the clustering really ran
    assert "grouped(16) step / per-tensor step" in md
