"""A wheel built from the tracked sources ships every integration package (package discovery, no hand list)."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _source_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to list the sources")
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return [f for f in out if (ROOT / f).is_file()]


def test_wheel_contains_every_integration_package(tmp_path):
    src = tmp_path / "src"
    for rel in _source_files():  # a clean copy: no build/, egg-info or caches
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "--wheel-dir", str(tmp_path / "dist"), str(src)], check=True, capture_output=True,
                   env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    toolkits = sorted(p.parent.name for p in (ROOT / "integrations").glob("*/__init__.py"))
    assert toolkits == ["brevitas", "torch_ao", "torchao"]
    for toolkit in toolkits:
        for module in (ROOT / "integrations" / toolkit).glob("*.py"):
            assert f"idkm_plugin/integrations/{toolkit}/{module.name}" in names
    for module in (ROOT / "idkm_plugin").rglob("*.py"):
        assert module.relative_to(ROOT).as_posix() in names
    assert "idkm_plugin/integrations/__init__.py" in names
