"""Test-session setup.

tests/ and benchmarks/ are on ``sys.path`` through pyproject's pytest ``pythonpath``.

Triton's interpreter: tests/step/test_kernels.py runs the Triton kernels on CPU tensors. The interpreter is
chosen when a function is decorated with ``@triton.jit``, and Triton's own ``tl.sum``/``tl.max`` are decorated
when ``triton`` is first imported, which other imports (peft, torch._dynamo) do during collection. So the
choice is made here, before any test module is imported, and only without a CUDA device: on a GPU machine the
kernels stay compiled (tests/step/test_kernels_cuda.py) and test_kernels.py skips itself.
"""

import os

import torch

torch.set_num_threads(1)  # tiny models; and the 2 cores are often shared
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# ---- the loopback Hub (tests/hub_server.py), for every test module that pushes or pulls ----------------------------

import pytest  # noqa: E402
from huggingface_hub import constants  # noqa: E402
from hub_server import LoopbackHub  # noqa: E402


@pytest.fixture(scope="session")
def hub_server():
    with LoopbackHub() as server:
        yield server


@pytest.fixture
def hub(hub_server, monkeypatch, tmp_path):
    """The loopback Hub as the client's endpoint, with a fresh cache and no credentials or telemetry."""
    hub_server.reset()
    monkeypatch.setattr(constants, "ENDPOINT", hub_server.endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub_server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield hub_server
    assert hub_server.unhandled == [], f"the client called routes the loopback Hub does not serve: {hub_server.unhandled}"
