"""Shared fixtures: one native WebGPU device (lavapipe in CI) for the whole test session."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import reference` from tests/
sys.path.insert(0, str(ROOT / "build"))  # `import serve`
os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp/tabgpt-xdg-%d" % os.getuid())
os.makedirs(os.environ["XDG_RUNTIME_DIR"], mode=0o700, exist_ok=True)


@pytest.fixture(scope="session")
def dev():
    """The native device held to WebGPU's default limits (what SwiftShader in Chromium grants), so that a
    kernel that would fail in the browser fails here too. Tests drive its coroutines with gpu.wait()."""
    from tabgpt import gpu
    return gpu.wait(gpu.open_device(limits=gpu.DEFAULT_LIMITS))
