"""Test-session setup.

Triton's interpreter: tests/test_kernels.py runs the Triton kernels on CPU tensors. The interpreter is
chosen when a function is decorated with ``@triton.jit``, and Triton's own ``tl.sum``/``tl.max`` are decorated
when ``triton`` is first imported, which other imports (peft, torch._dynamo) do during collection. So the
choice is made here, before any test module is imported, and only without a CUDA device: on a GPU machine the
kernels stay compiled (tests/test_kernels_cuda.py) and test_kernels.py skips itself.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)  # tiny models; and the 2 cores are often shared
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
