"""Compile every Triton kernel specialization the learned step launches, for a GPU target, without a GPU.

Run as a script (not collected by pytest): ``python tests/_compile_kernels.py [--bf16-only] [RULE ...]``. It runs the
launcher on CPU tensors with each kernel's launch replaced by a recorder, then compiles each recorded
launch with ``triton.compile`` for sm_90 (Hopper) through ptxas. Prints one line per kernel and exits
non-zero on the first failure. tests/test_kernels.py runs it in a subprocess (it must not see
``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from optbundle import LearnedRule, load_rule  # noqa: E402
from optbundle.step import reference as F  # noqa: E402
from optbundle.kernels import learned_step as K  # noqa: E402

KERNELS = ["_reduce_kernel", "_rows_cols_kernel", "_reduce_adafactor_kernel", "_fold_kernel", "_apply_kernel"]
_TORCH_SIG = {torch.float32: "*fp32", torch.int64: "*i64", torch.int32: "*i32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


class _Recorder:
    def __init__(self, kernel, name, seen):
        self.kernel, self.name, self.seen = kernel, name, seen

    def __getitem__(self, grid):
        def record(*args, **constexprs):
            names = self.kernel.arg_names
            signature, values = {}, {}
            for name, value in zip(names, args):
                if isinstance(value, torch.Tensor):
                    signature[name] = _TORCH_SIG[value.dtype]
                elif isinstance(value, float):
                    signature[name] = "fp32"
                else:
                    signature[name] = "i64"
            for name, value in constexprs.items():
                signature[name] = "constexpr"
                values[name] = value
            key = (self.name, tuple(sorted((k, repr(v)) for k, v in values.items())))
            if key not in self.seen:
                self.seen[key] = (self.kernel, signature, values)
        return record


def main(rules: list[str], dtypes=(torch.float32, torch.bfloat16)) -> int:
    seen: dict = {}
    originals = {name: getattr(K, name) for name in KERNELS}
    for name in KERNELS:
        setattr(K, name, _Recorder(originals[name], name, seen))
    K._block_sizes = lambda device: K.GPU_BLOCKS  # the sizes a CUDA launch uses
    configs = [load_rule(r).config for r in rules] or [load_rule("default-v2").config, load_rule("adam-init").config]
    for config in configs:
        rule = LearnedRule(config)
        weights = [(w.detach(), b.detach()) for w, b in rule.weights]
        for dtype in dtypes:
            shapes = [(7,), (33, 65), (4, 3, 5, 5)]
            params = [torch.zeros(s, dtype=dtype) for s in shapes]
            states = []
            for s in shapes:
                state = F.init_state(config, s)
                state["skipped_steps"] = torch.zeros((), dtype=torch.int64)
                states.append(state)
            K.learned_step_(config, weights, params, [p.clone() for p in params], states, 1.0, 0.1)
    target = GPUTarget("cuda", 90, 32)
    failures = 0
    for (name, _), (kernel, signature, constexprs) in seen.items():
        start = time.time()
        try:
            source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            compiled = triton.compile(source, target=target)
            print(f"ok   {name:26s} {time.time() - start:6.1f}s  shared={compiled.metadata.shared}B")
        except Exception as err:  # report and keep going, so one run lists every failure
            failures += 1
            print(f"FAIL {name:26s} {type(err).__name__}: {str(err)[:2000]}")
    print(f"{len(seen)} specializations, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    chosen = (torch.float32, torch.bfloat16)
    if "--bf16-only" in args:  # fp32 kernels differ only in pointer types; the quick check skips them
        args.remove("--bf16-only")
        chosen = (torch.bfloat16,)
    sys.exit(main(args, chosen))
