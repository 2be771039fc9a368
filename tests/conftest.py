"""Test set-up: NaN-poisoned kernel outputs, the Triton interpreter on CPU-only machines, GPU marker.

Both variables must be set before Triton kernels are defined (Triton reads TRITON_INTERPRET when
a kernel is decorated), hence here, at conftest import. Triton itself is imported here too: some
of its interpreter state is fixed when the package is first imported, and a test that sets
TRITON_INTERPRET=0 for a moment (to check the error saying why) must not be the first importer
(``import ssmkernels`` does not import Triton; it used to, through torch._dynamo).
"""
import os

import pytest
import torch

os.environ.setdefault("SSMKERNELS_POISON_OUTPUTS", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    import triton  # noqa: F401,E402  (see the docstring)
except ImportError:
    pass


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run scripts/gpu_suite.sh on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def scan_cuda_emulation(tmp_path_factory):
    """The selective-scan CUDA kernels compiled for the host (tests/scan_emulation.py), built once."""
    from tests import scan_emulation

    return scan_emulation.build_module(tmp_path_factory.mktemp("scan_emulation"))


@pytest.fixture
def emulated_scan_cuda(scan_cuda_emulation, monkeypatch):
    """``backend="cuda"`` served by the host emulation of the selective-scan kernels (CPU only)."""
    from tests import scan_emulation

    scan_emulation.install(scan_cuda_emulation, monkeypatch)
    return scan_cuda_emulation
