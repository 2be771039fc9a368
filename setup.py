"""Installs ssmkernels; builds the CUDA extension only when asked or when a GPU is found.

    pip install .                      # CPU-only machine: pure Python (reference + Triton backends)
    SSMKERNELS_CUDA=1 pip install .    # also build ssmkernels._C (CMake + ninja + nvcc)
    SSMKERNELS_CUDA=0 pip install .    # never build it

With SSMKERNELS_CUDA unset, the extension is built when nvcc is found *and* nvidia-smi lists a GPU.
A failed automatic build warns and installs pure Python (never fails the install); a failed build
that was asked for with SSMKERNELS_CUDA=1 fails loudly. Without the prebuilt module, the CUDA backend
compiles itself on first use and caches the result (see README).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _gpu_present() -> bool:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    result = subprocess.run([smi, "-L"], capture_output=True, text=True, check=False)
    return result.returncode == 0 and "GPU" in result.stdout


def _cuda_mode() -> str:
    value = os.environ.get("SSMKERNELS_CUDA", "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return "required"
    if value in ("0", "false", "no", "off"):
        return "off"
    return "auto"


def _load_build_module():
    """ssmkernels/_core/build.py (and the config it reads), without importing the ssmkernels package:
    the package imports torch, which pip's isolated build environment does not have."""
    import importlib.util
    import types

    core = types.ModuleType("_ssmkernels_build_core")
    core.__path__ = [str(ROOT / "ssmkernels" / "_core")]
    sys.modules[core.__name__] = core
    spec = importlib.util.spec_from_file_location(f"{core.__name__}.build", ROOT / "ssmkernels" / "_core" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class BuildPyWithNative(build_py):
    """Ships CMakeLists.txt + csrc/ inside the package (for first-use builds) and, when CUDA is
    wanted, builds ssmkernels._C into the package."""

    def run(self):
        super().run()
        package_dir = Path(self.build_lib) / "ssmkernels"
        native = package_dir / "_native"
        if native.exists():
            shutil.rmtree(native)
        shutil.copytree(ROOT / "csrc", native / "csrc")
        shutil.copy2(ROOT / "CMakeLists.txt", native / "CMakeLists.txt")
        mode = _cuda_mode()
        if mode == "off" or (mode == "auto" and not (shutil.which("nvcc") and _gpu_present())):
            return
        build = _load_build_module()
        try:
            build.build(package_dir, Path(self.build_temp if hasattr(self, "build_temp") else "build") / "cmake",
                        verbose=True)
        except Exception as exc:
            if mode == "required":
                raise
            print(f"WARNING: building the ssmkernels CUDA extension failed; installing without it "
                  f"(it will be compiled on first use). Reason: {exc}", file=sys.stderr)


setup(
    name="ssmkernels",
    version="0.1.0",
    description="Fused state-space-model kernels: selective scan, SSD, causal conv1d, state update",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ssmkernels", "ssmkernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "triton>=3.2; platform_system == 'Linux'",
                      "pybind11>=2.12", "cmake>=3.24", "ninja"],
    extras_require={
        "test": ["pytest", "pytest-benchmark"],
        "plot": ["matplotlib"],
        "hf": ["transformers", "safetensors"],
    },
    entry_points={"console_scripts": ["ssmkernels=ssmkernels.cli:main"]},
    cmdclass={"build_py": BuildPyWithNative},
    zip_safe=False,
)
