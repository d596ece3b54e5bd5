"""DDP on CPU: two gloo processes under torchrun run Trainer with the bundle's learned optimizer."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parents[1] / "_ddp_trainer.py"


def run(cmd, tmp_path, timeout=600):
    """Run ``cmd`` in its own process group so that a hang kills the workers too, not only torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{cmd} timed out after {timeout}s\n{stdout[-2000:]}{stderr[-2000:]}") from None
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]


@pytest.mark.slow
def test_two_gloo_ranks_agree_with_each_other_and_with_one_process(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    run([str(torchrun), "--standalone", "--nproc_per_node=2", str(SCRIPT), str(tmp_path)], tmp_path)
    run([sys.executable, str(SCRIPT), str(tmp_path)], tmp_path)
    rank0 = load_file(tmp_path / "world2-rank0.safetensors")
    rank1 = load_file(tmp_path / "world2-rank1.safetensors")
    single = load_file(tmp_path / "world1-rank0.safetensors")
    init = {n: p.detach() for n, p in __import__("helpers").digits_bert().named_parameters()}
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks differ on {name}"
    # Same global batch: DDP's averaged gradient is the single process's up to summation order. Compare the
    # whole update (single coordinates with a ~0 gradient are sign-like noise for any Adam-like step).
    difference = torch.sqrt(sum(((rank0[n] - single[n]) ** 2).sum() for n in single))
    update = torch.sqrt(sum(((single[n] - init[n]) ** 2).sum() for n in single))
    assert update > 0
    assert difference <= 0.05 * update, (float(difference), float(update))
