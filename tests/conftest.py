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
    """The selective-scan CUDA kernels compiled for the host (tests/cuda_emulation.py), built once."""
    from tests import cuda_emulation

    return cuda_emulation.build_scan_module(tmp_path_factory.mktemp("scan_emulation"))


@pytest.fixture
def emulated_scan_cuda(scan_cuda_emulation, monkeypatch):
    """``backend="cuda"`` served by the host emulation of the selective-scan kernels (CPU only)."""
    from tests import cuda_emulation

    cuda_emulation.install(scan_cuda_emulation, monkeypatch)
    return scan_cuda_emulation


@pytest.fixture(scope="session")
def state_update_cuda_emulation(tmp_path_factory):
    """The state-update CUDA kernel and launcher compiled for the host, built once."""
    from tests import cuda_emulation

    return cuda_emulation.build_state_update_module(tmp_path_factory.mktemp("state_update_emulation"))


@pytest.fixture
def emulated_state_update_cuda(state_update_cuda_emulation, monkeypatch):
    """``backend="cuda"`` served by the host emulation of the state-update kernel (CPU only)."""
    from ssmkernels.ops.state_update import op
    from tests import cuda_emulation

    cuda_emulation.install(state_update_cuda_emulation, monkeypatch)
    op.clear_caches()  # plans made for another backend module must not serve these calls
    yield state_update_cuda_emulation
    op.clear_caches()
