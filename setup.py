"""Package discovery: idkm_plugin/* and every integrations/<toolkit>/ shipped as idkm_plugin.integrations.<toolkit>.

Metadata lives in pyproject.toml; only the package list is computed here, so a new integration folder
ships without editing a hand-kept list.
"""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["idkm_plugin", "idkm_plugin.*"])
      + ["idkm_plugin.integrations"]
      + [f"idkm_plugin.integrations.{name}" for name in find_packages("integrations")])
