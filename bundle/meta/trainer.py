"""`MetaTrainer`: the outer loop that learns φ from vectorized truncated unrolls, resumable and distributable.

One meta-step: every task group this rank owns gives one meta-gradient estimate (PES / ES / TBPTT, see
`estimators.py`); the estimates are summed, all-reduced over ranks (``torch.distributed``, gloo on CPU) and
divided by the global number of groups; NaNs become 0, values are clipped element-wise; ``torch.optim.AdamW`` updates the
masked part of ``θ``. Every rank computes the same update from the same all-reduced gradient, so φ stays
identical everywhere. Group ``i`` (global index) always draws from the generator seeded with
``(seed, i)``, so the estimate of a group does not depend on which rank runs it.

Checkpoints (``out_dir/checkpoints/step-N/``, safetensors + JSON, no pickle): ``θ``, the AdamW state (moments and
step), the meta-step, history, and per rank every group's inner state and RNG state. ``latest.json`` is written
last (atomically) and points at the newest complete checkpoint, so a run killed at any moment resumes from a
complete state and, CPU math being deterministic for a fixed thread count, reaches bit-identical φ.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..files import VERSION, atomic_save_safetensors, atomic_write_json, load_safetensors_file, read_json_file
from ..recipes import parse_config, parse_recipe, recipe_path
from ..step.rule import RuleConfig
from ..store.rule import LearnedRule, load_rule
from . import estimators as E
from . import unroll as U

logger = logging.getLogger(__name__)

ESTIMATORS = ("pes", "es", "tbptt")


@dataclass
class EstimatorConfig:
    """The meta-gradient settings `MetaTrainConfig` and `RefineConfig` (meta/refine.py) share, with the same
    meaning, YAML key and default in both."""

    #: meta-gradient estimator, one of `ESTIMATORS` (see `estimators.py`)
    estimator: str = "pes"
    #: std of the antithetic perturbations of θ (PES / ES)
    sigma: float = 0.01
    #: element-wise clip of the meta-gradient before the outer AdamW step
    gradient_clip: float = 3.0


@dataclass
class MetaTrainConfig(EstimatorConfig):
    """A meta-training run. Loadable from a YAML recipe (`load_recipe`); every field has a YAML key (the
    estimator's fields come from `EstimatorConfig`)."""

    name: str = "meta-train"
    seed: int = 0
    #: starting φ: "adam-init" (the shipped rule), "scratch" (a fresh `rule_config` rule) or a rule directory
    init: str = "scratch"
    #: RuleConfig fields for ``init: scratch``
    rule_config: dict[str, Any] = field(default_factory=dict)
    #: zero the output layer of a scratch rule (an ``adam_residual`` rule then starts as exactly Adam)
    zero_init_last_layer: bool = True
    truncation: int = 20
    episode_length: tuple[int, int] = (100, 1000)
    task_groups: int = 4
    instances_per_group: int = 4
    tasks: list[dict[str, Any]] = field(default_factory=lambda: [{"family": "mlp", "datasets": ["digits8"]}])
    #: weight reparametrization s ∈ [lo, hi] log-uniform (null: off)
    reparam_range: tuple[float, float] | None = None
    meta_loss: dict[str, Any] = field(default_factory=dict)
    outer_lr: float = 1e-3
    outer_betas: tuple[float, float] = (0.9, 0.999)
    outer_weight_decay: float = 0.0
    #: which part of φ trains: "all", "last_layer", "first_layer", "output_scale" or a list of φ tensor names
    trainable: Any = "all"
    #: fixed tasks only: probability that a new episode continues from where the last one ended
    restart_prob: float = 0.0
    meta_steps: int = 1000
    checkpoint_every: int = 25
    keep_checkpoints: int = 2
    out_dir: str = "runs/meta-train"
    #: torch intra-op threads for this process (None: leave torch's setting alone)
    threads: int | None = None
    #: stop (after a checkpoint) once this much wall time was spent in this process; resume continues
    max_wall_time_s: float | None = None
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        self.episode_length = tuple(int(x) for x in self.episode_length)
        self.outer_betas = tuple(float(x) for x in self.outer_betas)
        if self.reparam_range is not None:
            self.reparam_range = tuple(float(x) for x in self.reparam_range)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "meta-training config") -> MetaTrainConfig:
        (config,) = parse_config((cls,), data, source=source)
        return config


def load_recipe(name_or_path: str | Path, **overrides: Any) -> MetaTrainConfig:
    """A `MetaTrainConfig` from a shipped recipe name (``recipes/NAME.yaml``) or a YAML path, plus overrides."""
    stem = recipe_path(str(name_or_path)).stem
    overrides = {k: v for k, v in overrides.items() if v is not None}
    _, (config,) = parse_recipe(name_or_path, (MetaTrainConfig,), overrides, defaults={"name": stem})
    return config


def code_version() -> str:
    """optbundle's version plus the git commit of the source tree when there is one."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{VERSION}+g{commit}" if commit else VERSION


def initial_rule(config: MetaTrainConfig) -> LearnedRule:
    """The starting φ named by ``config.init`` (deterministic for ``config.seed``)."""
    if config.init == "adam-init":
        return load_rule("adam-init")
    if config.init == "scratch":
        rule_config = RuleConfig(**config.rule_config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            rule = LearnedRule(rule_config)
        if config.zero_init_last_layer:
            with torch.no_grad():
                rule.layers[-1].weight.zero_()
                rule.layers[-1].bias.zero_()
        return rule
    return LearnedRule.from_pretrained(config.init)


class MetaTrainer:
    """Meta-train a rule as ``config`` says; ``train()`` returns the `LearnedRule`.

    ``task`` (optional) fixes every group's task to one object (e.g. a `tasks.ModuleTask` for refinement)
    instead of sampling specs from ``config.tasks``; ``initial`` (optional) is the starting rule instead of
    ``config.init`` (refinement starts from a bundle's rule). Under ``torchrun`` the process group is created from the
    environment (gloo on CPU) unless one exists.
    """

    def __init__(
        self,
        config: MetaTrainConfig,
        task: Any = None,
        out_dir: str | Path | None = None,
        initial: LearnedRule | None = None,
    ) -> None:
        self.config = config
        self.fixed_task = task
        self.out_dir = Path(out_dir or config.out_dir)
        self.loss_cfg = E.MetaLossConfig(**config.meta_loss)
        self._setup_distributed()
        if config.threads is not None:
            torch.set_num_threads(max(1, int(config.threads)))
        self.parent = initial if initial is not None else initial_rule(config)
        self.rule_config = self.parent.config
        self.theta = U.flatten_rule(self.parent)
        if self.distributed:
            dist.broadcast(self.theta, src=0)
        self.mask = U.parameter_mask(self.rule_config, config.trainable)
        self.outer = E.outer_optimizer(self.theta, config.outer_lr, config.outer_betas, config.outer_weight_decay)
        self.meta_step = 0
        self.history: list[dict[str, float]] = []
        self.wall_time_s = 0.0
        self.inner_steps = 0
        owned = [i for i in range(config.task_groups) if i % self.world_size == self.rank]
        copies = 1 if config.estimator == "tbptt" else 2
        self.groups = [
            U.TaskGroup(
                index=i,
                generator=torch.Generator().manual_seed(config.seed * 1_000_003 + i),
                instances=config.instances_per_group,
                copies_per_instance=copies,
            )
            for i in owned
        ]
        if not self.load_checkpoint():
            for group in self.groups:
                self._reset(group, first=True)

    # ---- distributed ---------------------------------------------------------------------------------
    def _setup_distributed(self) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="gloo")
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # ---- the loop -------------------------------------------------------------------------------------
    def _reset(self, group: U.TaskGroup, first: bool = False) -> None:
        c = self.config
        U.reset_group(
            group,
            self.rule_config,
            self.theta.numel(),
            c.tasks,
            c.episode_length,
            c.reparam_range,
            fixed_task=self.fixed_task,
            random_offset=first and c.estimator != "es",
            restart_prob=0.0 if first else c.restart_prob,
        )

    def step(self) -> dict[str, float]:
        """One meta-step (see the module docstring); returns its statistics."""
        c = self.config
        start = time.perf_counter()
        gradient_sum = torch.zeros_like(self.theta)
        stats = torch.zeros(3, dtype=torch.float64)  # meta-loss sum, inner copy-steps, groups
        for group in self.groups:
            if c.estimator == "pes":
                gradient, info = E.pes_gradient(
                    self.rule_config, self.theta, group, c.sigma, c.truncation, self.mask, self.loss_cfg
                )
            elif c.estimator == "es":
                gradient, info = E.es_gradient(
                    self.rule_config, self.theta, group, c.sigma, self.mask, self.loss_cfg, lambda g=group: self._reset(g)
                )
            else:
                gradient, info = E.tbptt_gradient(
                    self.rule_config, self.theta, group, c.truncation, self.mask, self.loss_cfg
                )
            gradient_sum += gradient
            stats += torch.tensor([info.meta_loss, info.steps * info.copies, 1.0], dtype=torch.float64)
            if info.episode_done and c.estimator != "es":
                self._reset(group)
        if self.distributed:
            dist.all_reduce(gradient_sum)
            dist.all_reduce(stats)
        gradient = E.sanitize_meta_gradient(gradient_sum / c.task_groups, c.gradient_clip)
        E.outer_step(self.outer, gradient, self.mask)
        self.meta_step += 1
        self.inner_steps += int(stats[1])
        seconds = time.perf_counter() - start
        record = {
            "meta_step": self.meta_step,
            "meta_loss": float(stats[0] / stats[2]),
            "gradient_rms": float(gradient.pow(2).mean().sqrt()),
            "copy_steps_per_s": float(stats[1]) / max(seconds, 1e-9) / self.world_size,
        }
        self.history.append(record)
        return record

    def train(self) -> LearnedRule | None:
        """Run to ``config.meta_steps`` (checkpointing on the way); returns the trained rule, or ``None``
        when ``max_wall_time_s`` stopped the run early (resume by running again with the same config)."""
        from tqdm.auto import tqdm  # loaded on first use

        c = self.config
        session_start = time.perf_counter()
        last = time.perf_counter()
        bar = tqdm(
            total=c.meta_steps, initial=self.meta_step, disable=not c.progress or self.rank != 0, desc=c.name, mininterval=2.0
        )
        stopped_early = False
        while self.meta_step < c.meta_steps:
            record = self.step()
            now = time.perf_counter()
            self.wall_time_s += now - last
            last = now
            bar.update(1)
            if self.meta_step % max(c.log_every, 1) == 0:
                window = self.history[-c.log_every :]
                mean_loss = sum(r["meta_loss"] for r in window) / len(window)
                bar.set_postfix(meta_loss=f"{mean_loss:.4f}")
                logger.info(
                    "meta-step %d  meta-loss %.4f  grad-rms %.3g  %.0f copy-steps/s",
                    self.meta_step, mean_loss, record["gradient_rms"], record["copy_steps_per_s"],
                )
            out_of_time = c.max_wall_time_s is not None and now - session_start > c.max_wall_time_s
            if self.distributed:
                flag = torch.tensor([1.0 if out_of_time else 0.0])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                out_of_time = bool(flag.item())
            if self.meta_step % max(c.checkpoint_every, 1) == 0 or self.meta_step == c.meta_steps or out_of_time:
                self.save_checkpoint()
            if out_of_time and self.meta_step < c.meta_steps:
                stopped_early = True
                logger.info("max_wall_time_s reached at meta-step %d; checkpoint saved, resume to continue", self.meta_step)
                break
        bar.close()
        if stopped_early:
            return None
        rule = self.rule()
        if self.rank == 0:
            rule.save_pretrained(self.out_dir / "rule")
            self.plot(self.out_dir / "meta_loss.png")
        self._barrier()
        return rule

    # ---- outputs --------------------------------------------------------------------------------------
    def rule(self) -> LearnedRule:
        """The current φ as a `LearnedRule` with provenance."""
        rule = LearnedRule(self.rule_config)
        U.load_flat_into_rule(rule, self.theta)
        c = self.config
        rule.provenance = {
            "meta_trained": True,
            "method": "meta-training",
            "recipe": c.name,
            "recipe_command": f"python -m optbundle.meta.train {c.name} --meta-steps {self.meta_step}",
            "estimator": c.estimator,
            "sigma": c.sigma,
            "truncation": c.truncation,
            "episode_length": list(c.episode_length),
            "meta_steps": self.meta_step,
            "inner_copy_steps": self.inner_steps,
            "task_groups": c.task_groups,
            "instances_per_group": c.instances_per_group,
            "tasks": c.tasks if self.fixed_task is None else [self.fixed_task.spec],
            "reparam_range": list(c.reparam_range) if c.reparam_range else None,
            "meta_loss": dataclasses.asdict(self.loss_cfg),
            "outer_optimizer": {"name": "adamw", "lr": c.outer_lr, "betas": list(c.outer_betas),
                                "weight_decay": c.outer_weight_decay, "gradient_clip": c.gradient_clip},
            "trainable": c.trainable,
            "seed": c.seed,
            "world_size": self.world_size,
            "wall_time_s": round(self.wall_time_s, 1),
            "code_version": code_version(),
            "init": c.init,
            "parent_rule": self.parent.content_hash(),
            "final_meta_loss_mean_last_50": (
                sum(r["meta_loss"] for r in self.history[-50:]) / max(len(self.history[-50:]), 1)
            ),
        }
        return rule

    def plot(self, path: Path) -> None:
        """PNG of the per-step meta-loss and its running mean."""
        import matplotlib  # heavy: only for the plot

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # heavy: only for the plot

        steps = [r["meta_step"] for r in self.history]
        losses = [r["meta_loss"] for r in self.history]
        window = max(1, len(losses) // 50)
        smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, losses, alpha=0.3, lw=0.8, label="meta-loss")
        ax.plot(steps, smooth, lw=1.5, label=f"running mean ({window})")
        ax.set_xlabel("meta-step")
        ax.set_ylabel(f"meta-loss ({self.loss_cfg.transform} of normalized loss)")
        ax.set_title(self.config.name)
        ax.legend()
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)

    # ---- checkpoints ----------------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return self.out_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Write the whole outer state (+ this rank's groups) as ``checkpoints/step-N`` and point ``latest.json`` at it."""
        root = self.checkpoint_root
        directory = root / f"step-{self.meta_step:07d}"
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        metadata = []
        for group in self.groups:
            tensors.update({f"group{group.index}/{k}": v for k, v in U.group_tensors(group).items()})
            metadata.append(U.group_metadata(group))
        atomic_save_safetensors(directory / f"groups-rank{self.rank}.safetensors", tensors)
        atomic_write_json(directory / f"groups-rank{self.rank}.json", metadata)
        if self.rank == 0:
            adamw = self.outer.state_dict()["state"].get(0, {})  # empty before the first step
            outer = {"theta": self.theta, **{f"adamw/{k}": v for k, v in adamw.items()}}
            atomic_save_safetensors(directory / "outer.safetensors", outer)
            atomic_write_json(
                directory / "outer.json",
                {
                    "meta_step": self.meta_step,
                    "wall_time_s": self.wall_time_s,
                    "inner_steps": self.inner_steps,
                    "world_size": self.world_size,
                    "config": self.config.to_dict(),
                    "history": self.history,
                },
            )
        self._barrier()
        if self.rank == 0:
            atomic_write_json(root / "latest.json", {"meta_step": self.meta_step, "directory": directory.name})
            old = sorted(p for p in root.glob("step-*") if p.is_dir() and p != directory)
            for stale in old[: max(0, len(old) - (self.config.keep_checkpoints - 1))]:
                shutil.rmtree(stale, ignore_errors=True)
        self._barrier()
        return directory

    def load_checkpoint(self) -> bool:
        """Resume from ``checkpoints/latest.json`` if it exists; returns whether a checkpoint was loaded."""
        pointer = self.checkpoint_root / "latest.json"
        if not pointer.exists():
            return False
        directory = self.checkpoint_root / read_json_file(pointer)["directory"]
        outer_meta = read_json_file(directory / "outer.json")
        volatile = {"meta_steps", "max_wall_time_s", "progress", "out_dir", "threads", "log_every", "checkpoint_every",
                    "keep_checkpoints"}
        saved, current = outer_meta.get("config", {}), self.config.to_dict()
        changed = sorted(k for k in set(saved) | set(current) if k not in volatile and saved.get(k) != current.get(k))
        if changed:
            raise RuntimeError(
                f"{directory}: the checkpoint was written with a different config ({', '.join(changed)} differ); "
                f"resume with the same settings or use another out_dir"
            )
        if outer_meta["world_size"] != self.world_size:
            raise RuntimeError(
                f"{directory}: checkpoint was written by {outer_meta['world_size']} process(es); resume with the same "
                f"--nproc_per_node (this run has {self.world_size})"
            )
        outer = load_safetensors_file(directory / "outer.safetensors")
        with torch.no_grad():
            self.theta.copy_(outer["theta"])
        adamw = {k.removeprefix("adamw/"): v for k, v in outer.items() if k.startswith("adamw/")}
        self.outer.load_state_dict({"state": {0: adamw} if adamw else {}, "param_groups": self.outer.state_dict()["param_groups"]})
        self.meta_step = int(outer_meta["meta_step"])
        self.wall_time_s = float(outer_meta["wall_time_s"])
        self.inner_steps = int(outer_meta["inner_steps"])
        self.history = list(outer_meta["history"])
        tensors = load_safetensors_file(directory / f"groups-rank{self.rank}.safetensors")
        metadata = read_json_file(directory / f"groups-rank{self.rank}.json")
        restored = []
        for meta in metadata:
            prefix = f"group{meta['index']}/"
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            restored.append(U.restore_group(meta, own, fixed_task=self.fixed_task))
        if [g.index for g in restored] != [g.index for g in self.groups]:
            raise RuntimeError(f"{directory}: checkpoint groups do not match this run's task_groups/world size")
        self.groups = restored
        logger.info("resumed from %s (meta-step %d)", directory, self.meta_step)
        return True


def rule_from_checkpoint(out_dir: str | Path) -> LearnedRule:
    """The φ of the newest checkpoint of a (possibly unfinished) run as a `LearnedRule` (no provenance).

    Handy to evaluate a run while it trains; the finished rule with provenance is ``out_dir/rule``.
    """
    root = Path(out_dir) / "checkpoints"
    directory = root / read_json_file(root / "latest.json")["directory"]
    meta = read_json_file(directory / "outer.json")
    config = MetaTrainConfig.from_dict(meta["config"])
    rule = LearnedRule(initial_rule(config).config)
    U.load_flat_into_rule(rule, load_safetensors_file(directory / "outer.safetensors")["theta"])
    rule.provenance = {"meta_trained": True, "checkpoint": str(directory), "meta_steps": meta["meta_step"], "recipe": config.name}
    return rule
