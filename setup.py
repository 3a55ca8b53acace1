"""Package discovery and the optional native extension.

Metadata lives in pyproject.toml. Here: the package list (idkm_plugin/* and every integrations/<toolkit>/ shipped
as idkm_plugin.integrations.<toolkit>, so a new integration folder ships without editing a list), and the C++ ops
in idkm_plugin/csrc/ built into `idkm_plugin._C` against the installed torch. The extension is optional: without
torch at build time (build isolation) or without a compiler, the package installs pure-Python and
`idkm_plugin.native` says once that the PyTorch paths are used. `make venv` builds it (--no-build-isolation).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

PACKAGES = (find_packages(include=["idkm_plugin", "idkm_plugin.*"])
            + ["idkm_plugin.integrations"]
            + [f"idkm_plugin.integrations.{name}" for name in find_packages("integrations")])


def native_extension():
    """(ext_modules, cmdclass) for idkm_plugin._C, or ([], {}) when torch is not importable here."""
    if os.environ.get("IDKM_PLUGIN_NO_NATIVE"):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("idkm_plugin: torch is not importable at build time; skipping the native ops", file=sys.stderr)
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """A failed compile leaves the pure-PyTorch package installable (the ops fall back)."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as err:  # no compiler, missing headers: the fallback is the PyTorch path
                print(f"idkm_plugin: building the native ops failed ({err}); the PyTorch paths will be used",
                      file=sys.stderr)

    sources = sorted(glob.glob(os.path.join("idkm_plugin", "csrc", "*.cpp")))
    ext = CppExtension("idkm_plugin._C", sources,
                       extra_compile_args=["-O3", "-fopenmp", "-std=c++17"],
                       extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = native_extension()
setup(packages=PACKAGES, ext_modules=ext_modules, cmdclass=cmdclass)
