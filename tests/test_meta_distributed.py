"""torchrun scale-out: 2 gloo ranks keep φ identical and agree with a 1-process run over the same task groups."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from optbundle.files import load_safetensors_file
from optbundle.meta import MetaTrainConfig, MetaTrainer, flatten_rule

WORKER = Path(__file__).resolve().parent / "_meta_dist_worker.py"

RECIPE = dict(
    name="tiny-distributed",
    seed=5,
    init="scratch",
    rule_config=dict(features=["grad", "momentum", "adam_direction", "time"], hidden_sizes=[4], output="adam_residual",
                     step_mult=0.01, magnitude_bound=1.0),
    zero_init_last_layer=False,
    estimator="pes",
    truncation=3,
    episode_length=[4, 9],
    task_groups=4,
    instances_per_group=2,
    tasks=[{"family": "mlp", "datasets": ["digits8"], "width": [4, 8], "depth": [1, 1], "batch_sizes": [16]}],
    reparam_range=[0.5, 2.0],
    outer_lr=0.01,
    meta_steps=4,
    checkpoint_every=2,
    progress=False,
)


def torchrun() -> list[str]:
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def test_two_gloo_ranks_match_each_other_and_one_process(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    out = tmp_path / "two"
    command = [*torchrun(), "--standalone", "--nproc_per_node=2", str(WORKER), str(recipe), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = load_safetensors_file(out / "theta-rank0.safetensors")["theta"]
    rank1 = load_safetensors_file(out / "theta-rank1.safetensors")["theta"]
    assert torch.equal(rank0, rank1), "φ differs across ranks"
    single = MetaTrainer(MetaTrainConfig.from_dict({**RECIPE, "out_dir": str(tmp_path / "one")}))
    single.train()
    assert not torch.equal(single.theta, flatten_rule(single.parent)), "φ did not move"
    # same groups, same seeds: only the order of the floating-point sum of group estimates differs
    assert torch.allclose(rank0, single.theta, rtol=1e-4, atol=1e-5), (rank0 - single.theta).abs().max()
    # the distributed run checkpoints per rank and records its world size
    step_dir = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert (step_dir / "groups-rank0.safetensors").exists() and (step_dir / "groups-rank1.safetensors").exists()
    assert (out / "rule" / "provenance.json").exists()
    assert '"world_size": 2' in (out / "rule" / "provenance.json").read_text()
