"""The native build pipeline: cache keys, JIT policy and error reporting (no GPU needed).

.ci/run builds and links the real extension; these tests cover the Python side of loading it.
"""
import importlib
import shutil

import pytest

from ssmkernels._core import build, ext


def test_source_root_has_cmake_and_csrc():
    root = build.source_root()
    assert (root / "CMakeLists.txt").is_file() and (root / "csrc" / "bindings.cpp").is_file()


@pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc not installed")
def test_cache_key_tracks_sources_and_archs(tmp_path):
    root = tmp_path / "src"
    shutil.copytree(build.source_root() / "csrc", root / "csrc")
    shutil.copy2(build.source_root() / "CMakeLists.txt", root / "CMakeLists.txt")
    nvcc = build.find_nvcc()
    key = build.cache_key(root, nvcc, "90a")
    assert key == build.cache_key(root, nvcc, "90a")
    assert key != build.cache_key(root, nvcc, "80;90a")
    (root / "csrc" / "common.h").write_text((root / "csrc" / "common.h").read_text() + "\n// edit\n")
    assert key != build.cache_key(root, nvcc, "90a")


def test_disabled_jit_explains_how_to_build(monkeypatch, tmp_path):
    try:
        importlib.import_module("ssmkernels._C")
        pytest.skip("a prebuilt extension is installed")
    except ImportError:
        pass
    monkeypatch.setenv("SSMKERNELS_DISABLE_JIT", "1")
    monkeypatch.setenv("SSMKERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ext, "_tried", False)
    monkeypatch.setattr(ext, "_module", None)
    monkeypatch.setattr(ext, "_error", None)
    reason = ext.load_error()
    assert reason is not None
    assert "python -m ssmkernels build" in reason or "nvcc not found" in reason
    with pytest.raises(RuntimeError, match="unavailable"):
        ext.module()
