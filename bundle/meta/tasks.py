"""Tasks: the optimization problems a rule is meta-trained (and refined) on.

A task is three pure functions over *stacked* parameters (every tensor carries a leading copy dim ``C``):

- ``init_params(generator, n) -> {name: (n, *S)}``: ``n`` independent initializations;
- ``sample_batch(generator, n) -> tuple``: ``n`` independent batches, every tensor with leading ``n``;
- ``loss(params, batch) -> (C,)``: one loss per copy, copy ``c`` reading ``params[name][c]`` and ``batch[·][c]``.

Copies never interact, so ``torch.autograd.grad(loss(...).sum(), params)`` is every copy's own gradient, and
the antithetic ± members of a pair share init and data simply by repeating the ``n`` rows (see `unroll.py`).

Families: `MLPClassifier` (stacked weights + ``baddbmm``) on small real images, `CharTransformerLM` (a tiny
pre-LN transformer on Shakespeare characters, batched over copies), and `ModuleTask` (any ``nn.Module`` + a
batch sampler, through ``torch.func.functional_call`` + ``vmap``: the entry point meta-refinement reuses).
A task spec (a JSON dict) names a family and its hyper-parameters; `build_task` turns it into a task and
`sample_task_spec` draws one from a recipe's task distribution.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from . import data

Params = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, ...]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "silu": F.silu,
    "elu": F.elu,
    "leaky_relu": F.leaky_relu,
}


class Task(Protocol):
    """The task protocol (see the module docstring)."""

    spec: dict[str, Any]

    def init_params(self, generator: torch.Generator, n: int) -> Params: ...

    def sample_batch(self, generator: torch.Generator, n: int) -> Batch: ...

    def loss(self, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor: ...


def _uniform(shape: Sequence[int], bound: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(tuple(shape), generator=generator) * 2 - 1) * bound


# ---- MLP classifiers -------------------------------------------------------------------------------------


@dataclass
class MLPClassifier:
    """``softmax(W_L σ(… σ(W_1 x + b_1) …) + b_L)`` with cross-entropy, on a dataset of `data.IMAGE_DATASETS`.

    Weights are stored ``(C, fan_out, fan_in)`` (torch's ``nn.Linear`` layout, which parameter roles and
    width multipliers read) and a layer is one ``baddbmm`` with the transposed view for all copies. Init is
    PyTorch's ``nn.Linear`` default (uniform ±1/√fan_in). Augmentations: inputs multiplied by
    ``input_scale``; each label replaced by a uniform random one with probability ``label_noise``.
    """

    dataset: str
    hidden: tuple[int, ...] = (32,)
    activation: str = "relu"
    batch_size: int = 64
    input_scale: float = 1.0
    label_noise: float = 0.0
    #: fine-tuning episode: start from this architecture pre-trained on ``pretrain_dataset`` (same input size)
    #: for ``pretrain_steps`` AdamW steps, with a fresh output layer (see `pretrained_start`)
    pretrain_dataset: str | None = None
    pretrain_steps: int = 300

    def __post_init__(self) -> None:
        self.inputs, self.labels, self.num_classes = data.classification_dataset(self.dataset)
        self.hidden = tuple(int(h) for h in self.hidden)
        self.sizes = [self.inputs.shape[1], *self.hidden, self.num_classes]

    @property
    def spec(self) -> dict[str, Any]:
        return {
            "family": "mlp",
            "dataset": self.dataset,
            "hidden": list(self.hidden),
            "activation": self.activation,
            "batch_size": self.batch_size,
            "input_scale": self.input_scale,
            "label_noise": self.label_noise,
            **({"pretrain_dataset": self.pretrain_dataset, "pretrain_steps": self.pretrain_steps} if self.pretrain_dataset else {}),
        }

    def init_params(self, generator: torch.Generator, n: int) -> Params:
        params = {}
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            bound = 1 / math.sqrt(fan_in)
            params[f"layer{i}.weight"] = _uniform((n, fan_out, fan_in), bound, generator)
            params[f"layer{i}.bias"] = _uniform((n, fan_out), bound, generator)
        if self.pretrain_dataset:
            source = MLPClassifier(self.pretrain_dataset, self.hidden, self.activation, 64)
            if source.sizes[0] != self.sizes[0]:
                raise ValueError(f"cannot fine-tune from {self.pretrain_dataset!r}: input size {source.sizes[0]} != {self.sizes[0]}")
            head = f"layer{len(self.sizes) - 2}."
            params = pretrained_start(source, params, generator, n, self.pretrain_steps, keep=lambda k: not k.startswith(head))
        return params

    def sample_batch(self, generator: torch.Generator, n: int) -> Batch:
        index = torch.randint(0, self.inputs.shape[0], (n, self.batch_size), generator=generator)
        labels = self.labels[index]
        if self.label_noise > 0:
            flip = torch.rand(labels.shape, generator=generator) < self.label_noise
            random_labels = torch.randint(0, self.num_classes, labels.shape, generator=generator)
            labels = torch.where(flip, random_labels, labels)
        return self.inputs[index] * self.input_scale, labels

    def logits(self, params: Mapping[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        activation = _ACTIVATIONS[self.activation]
        hidden = inputs
        layers = len(self.sizes) - 1
        for i in range(layers):
            hidden = torch.baddbmm(params[f"layer{i}.bias"].unsqueeze(-2), hidden, params[f"layer{i}.weight"].mT)
            if i < layers - 1:
                hidden = activation(hidden)
        return hidden

    def loss(self, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        inputs, labels = batch
        logits = self.logits(params, inputs)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape).mean(-1)


# ---- small conv nets --------------------------------------------------------------------------------------


@dataclass
class ConvClassifier:
    """A small conv net on 8×8 (or 28×28) single-channel images: ``len(channels)`` 3×3 conv layers (stride 1,
    padding 1, the activation after each, 2×2 average pooling after the second), global average pooling and a
    linear head. All copies run as ONE grouped convolution (``groups = C``). Weights ``(C, out, in, 3, 3)``
    (torch's layout: roles and width multipliers view them as ``out × in·9``); init as ``nn.Conv2d``."""

    dataset: str = "digits8"
    channels: tuple[int, ...] = (16, 32)
    activation: str = "relu"
    batch_size: int = 64

    def __post_init__(self) -> None:
        self.inputs, self.labels, self.num_classes = data.classification_dataset(self.dataset)
        self.channels = tuple(int(c) for c in self.channels)
        self.side = int(round(math.sqrt(self.inputs.shape[1])))

    @property
    def spec(self) -> dict[str, Any]:
        return {"family": "conv", "dataset": self.dataset, "channels": list(self.channels),
                "activation": self.activation, "batch_size": self.batch_size}

    def init_params(self, generator: torch.Generator, n: int) -> Params:
        params, previous = {}, 1
        for i, out in enumerate(self.channels):
            bound = 1 / math.sqrt(previous * 9)
            params[f"conv{i}.weight"] = _uniform((n, out, previous, 3, 3), bound, generator)
            params[f"conv{i}.bias"] = _uniform((n, out), bound, generator)
            previous = out
        bound = 1 / math.sqrt(previous)
        params["head.weight"] = _uniform((n, self.num_classes, previous), bound, generator)
        params["head.bias"] = _uniform((n, self.num_classes), bound, generator)
        return params

    def sample_batch(self, generator: torch.Generator, n: int) -> Batch:
        index = torch.randint(0, self.inputs.shape[0], (n, self.batch_size), generator=generator)
        return self.inputs[index], self.labels[index]

    def loss(self, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        inputs, labels = batch  # (C, b, side²)
        c, b, _ = inputs.shape
        activation = _ACTIVATIONS[self.activation]
        x = inputs.view(c, b, 1, self.side, self.side).transpose(0, 1).reshape(b, c, self.side, self.side)
        for i in range(len(self.channels)):
            w = params[f"conv{i}.weight"]
            x = F.conv2d(x, w.reshape(-1, *w.shape[2:]), params[f"conv{i}.bias"].reshape(-1), padding=1, groups=c)
            x = activation(x)
            if i == 1:
                x = F.avg_pool2d(x, 2)
        features = x.mean(dim=(-2, -1)).view(b, c, -1).transpose(0, 1)  # (C, b, channels)
        logits = torch.baddbmm(params["head.bias"].unsqueeze(-2), features, params["head.weight"].mT)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape).mean(-1)


# ---- tiny character transformer ------------------------------------------------------------------------


@dataclass
class CharTransformerLM:
    """Pre-LN causal transformer over Shakespeare characters, next-character cross-entropy.

    Per copy: token and position embeddings, ``layers`` blocks of (LN → multi-head causal attention → +,
    LN → GELU MLP ×4 → +), final LN and an untied output projection. Matrices are ``(C, out, in)`` (torch's
    layout); embeddings ``(C, vocab or context, d)``.
    """

    d_model: int = 32
    layers: int = 1
    heads: int = 2
    context: int = 32
    batch_size: int = 16
    genres: tuple[str, ...] = data.TRAIN_GENRES
    #: fine-tuning episode: start from this model pre-trained on ``pretrain_genres`` (see `pretrained_start`)
    pretrain_genres: tuple[str, ...] | None = None
    pretrain_steps: int = 300

    def __post_init__(self) -> None:
        self.genres = tuple(self.genres)
        self.pretrain_genres = tuple(self.pretrain_genres) if self.pretrain_genres else None
        self.tokens, self.vocab_size = data.shakespeare_tokens(self.genres)
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by heads {self.heads}")

    @property
    def spec(self) -> dict[str, Any]:
        return {
            "family": "char_lm",
            "d_model": self.d_model,
            "layers": self.layers,
            "heads": self.heads,
            "context": self.context,
            "batch_size": self.batch_size,
            "genres": list(self.genres),
            **({"pretrain_genres": list(self.pretrain_genres), "pretrain_steps": self.pretrain_steps} if self.pretrain_genres else {}),
        }

    def init_params(self, generator: torch.Generator, n: int) -> Params:
        d, v = self.d_model, self.vocab_size
        normal = lambda *shape, std: torch.randn((n, *shape), generator=generator) * std  # noqa: E731
        params = {"embed": normal(v, d, std=0.1), "position": normal(self.context, d, std=0.1)}
        for i in range(self.layers):
            params[f"block{i}.ln1.weight"] = torch.ones(n, d)
            params[f"block{i}.ln1.bias"] = torch.zeros(n, d)
            params[f"block{i}.qkv"] = normal(3 * d, d, std=1 / math.sqrt(d))
            params[f"block{i}.proj"] = normal(d, d, std=1 / math.sqrt(d * 2 * self.layers))
            params[f"block{i}.ln2.weight"] = torch.ones(n, d)
            params[f"block{i}.ln2.bias"] = torch.zeros(n, d)
            params[f"block{i}.fc1.weight"] = normal(4 * d, d, std=1 / math.sqrt(d))
            params[f"block{i}.fc1.bias"] = torch.zeros(n, 4 * d)
            params[f"block{i}.fc2.weight"] = normal(d, 4 * d, std=1 / math.sqrt(4 * d * 2 * self.layers))
            params[f"block{i}.fc2.bias"] = torch.zeros(n, d)
        params["ln_f.weight"] = torch.ones(n, d)
        params["ln_f.bias"] = torch.zeros(n, d)
        params["head"] = normal(v, d, std=1 / math.sqrt(d))
        if self.pretrain_genres:
            source = CharTransformerLM(self.d_model, self.layers, self.heads, self.context, 8, self.pretrain_genres)
            params = pretrained_start(source, params, generator, n, self.pretrain_steps, keep=lambda k: True)
        return params

    def sample_batch(self, generator: torch.Generator, n: int) -> Batch:
        start = torch.randint(0, self.tokens.numel() - self.context - 1, (n, self.batch_size, 1), generator=generator)
        index = start + torch.arange(self.context + 1)
        window = self.tokens[index]
        return window[..., :-1], window[..., 1:]

    def loss(self, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        inputs, targets = batch  # (C, b, T)
        c, b, t = inputs.shape
        d, h = self.d_model, self.heads

        def layer_norm(x: torch.Tensor, name: str) -> torch.Tensor:
            w, bias = params[f"{name}.weight"], params[f"{name}.bias"]
            return F.layer_norm(x, (d,)) * w.view(c, 1, d) + bias.view(c, 1, d)

        one_hot = F.one_hot(inputs.reshape(c, b * t), self.vocab_size).to(params["embed"].dtype)
        x = (one_hot @ params["embed"]).view(c, b, t, d) + params["position"][:, None, :t]
        x = x.reshape(c, b * t, d)
        for i in range(self.layers):
            qkv = layer_norm(x, f"block{i}.ln1") @ params[f"block{i}.qkv"].mT
            q, k, v = qkv.view(c * b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            attended = attended.permute(0, 2, 1, 3).reshape(c, b * t, d)
            x = x + attended @ params[f"block{i}.proj"].mT
            hidden = torch.baddbmm(
                params[f"block{i}.fc1.bias"].unsqueeze(1), layer_norm(x, f"block{i}.ln2"), params[f"block{i}.fc1.weight"].mT
            )
            x = x + torch.baddbmm(params[f"block{i}.fc2.bias"].unsqueeze(1), F.gelu(hidden), params[f"block{i}.fc2.weight"].mT)
        logits = layer_norm(x, "ln_f") @ params["head"].mT
        losses = F.cross_entropy(logits.reshape(c * b * t, -1), targets.reshape(-1), reduction="none")
        return losses.view(c, b * t).mean(-1)


# ---- fine-tuning episodes: pre-trained starting points ---------------------------------------------------

#: pre-trained starting points per task spec; each is trained once and cached on disk
PRETRAINED_COPIES = 4
PRETRAIN_LR = 3e-3


def pretrain_cache_dir() -> Path:
    """Where pre-trained starting points are cached (``$OPTBUNDLE_CACHE`` or ``~/.cache/optbundle``)."""
    root = os.environ.get("OPTBUNDLE_CACHE") or Path.home() / ".cache" / "optbundle"
    return Path(root) / "pretrained-tasks"


def pretrained_weights(source: Task, steps: int) -> Params:
    """``PRETRAINED_COPIES`` copies of ``source`` trained from seeds 0..3 with AdamW (lr `PRETRAIN_LR`, batch
    from the task) for ``steps`` steps; computed once per (spec, steps) and cached as safetensors."""
    key = hashlib.sha256(json.dumps({"spec": source.spec, "steps": steps, "lr": PRETRAIN_LR}, sort_keys=True).encode())
    path = pretrain_cache_dir() / f"{key.hexdigest()[:20]}.safetensors"
    if path.exists():
        return load_file(str(path))
    generator = torch.Generator().manual_seed(int(key.hexdigest()[:8], 16))
    leaves = {k: v.requires_grad_() for k, v in source.init_params(generator, PRETRAINED_COPIES).items()}
    optimizer = torch.optim.AdamW(leaves.values(), lr=PRETRAIN_LR, weight_decay=0.0)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        source.loss(leaves, source.sample_batch(generator, PRETRAINED_COPIES)).sum().backward()
        optimizer.step()
    weights = {k: v.detach().contiguous() for k, v in leaves.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    save_file(weights, str(temporary))
    os.replace(temporary, path)
    return weights


def pretrained_start(
    source: Task, fresh: Params, generator: torch.Generator, n: int, steps: int, keep: Callable[[str], bool]
) -> Params:
    """``fresh`` with every tensor ``keep`` selects replaced by a pre-trained copy (instance ``i`` draws one of
    the cached copies at random): the starting point of a fine-tuning episode (unkept tensors, e.g. a new
    classification head, stay freshly initialized)."""
    weights = pretrained_weights(source, steps)
    pick = torch.randint(0, PRETRAINED_COPIES, (n,), generator=generator)
    return {k: (weights[k][pick].clone() if keep(k) else v) for k, v in fresh.items()}


# ---- any nn.Module ---------------------------------------------------------------------------------------


class ModuleTask:
    """Fine-tune an arbitrary ``nn.Module`` on batches from ``sample_batch`` (the meta-refinement entry point).

    ``loss(params, batch)`` evaluates ``loss_fn(functional_call(module, params_c, inputs_c), targets_c)`` for
    every copy ``c`` at once with ``torch.func.vmap``. Only parameters with ``requires_grad`` are trained;
    buffers are shared by all copies. ``init_params`` starts every copy from the module's current weights
    (the pretrained point of a fine-tune), optionally plus Gaussian noise of relative size ``init_noise``.

    Args:
        module: the model; it is not modified.
        sample_batch: ``(generator, n) -> (inputs, targets)`` with leading dim ``n`` on both.
        loss_fn: ``(module_output, targets) -> scalar loss`` for one copy.
        name: a label for specs and provenance.
    """

    def __init__(
        self,
        module: nn.Module,
        sample_batch: Callable[[torch.Generator, int], Batch],
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
        name: str = "module",
        init_noise: float = 0.0,
    ) -> None:
        self.module = module
        self.regime = "finetune"  # episodes start from the module's (pre-trained) weights
        self._sample_batch = sample_batch
        self.loss_fn = loss_fn
        self.name = name
        self.init_noise = init_noise
        self.initial = {k: p.detach().clone() for k, p in module.named_parameters() if p.requires_grad}
        self.frozen = {k: p.detach() for k, p in module.named_parameters() if not p.requires_grad}
        self.buffers = {k: b.detach() for k, b in module.named_buffers()}

    @classmethod
    def from_tensors(
        cls,
        module: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        batch_size: int,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] = F.cross_entropy,
        name: str = "module",
        init_noise: float = 0.0,
    ) -> ModuleTask:
        """A task sampling minibatches of ``batch_size`` rows (with replacement) from in-memory tensors."""

        def sample(generator: torch.Generator, n: int) -> Batch:
            index = torch.randint(0, inputs.shape[0], (n, batch_size), generator=generator)
            return inputs[index], targets[index]

        return cls(module, sample, loss_fn, name=name, init_noise=init_noise)

    @property
    def spec(self) -> dict[str, Any]:
        return {"family": "module", "name": self.name}

    def init_params(self, generator: torch.Generator, n: int) -> Params:
        params = {}
        for key, value in self.initial.items():
            stacked = value.unsqueeze(0).expand(n, *value.shape).clone()
            if self.init_noise:
                rms = value.pow(2).mean().sqrt().clamp_min(1e-3)
                stacked = stacked + self.init_noise * rms * torch.randn(stacked.shape, generator=generator)
            params[key] = stacked
        return params

    def sample_batch(self, generator: torch.Generator, n: int) -> Batch:
        return self._sample_batch(generator, n)

    def loss(self, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        inputs, targets = batch
        fixed = {**self.frozen, **self.buffers}

        def one_copy(copy_params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            output = torch.func.functional_call(self.module, {**fixed, **copy_params}, (x,))
            return self.loss_fn(output, y)

        return torch.func.vmap(one_copy)(dict(params), inputs, targets)


# ---- specs and sampling ------------------------------------------------------------------------------


def build_task(spec: Mapping[str, Any]) -> Task:
    """The task a JSON spec describes (``family`` "mlp" or "char_lm")."""
    spec = dict(spec)
    family = spec.pop("family")
    if family == "mlp":
        spec["hidden"] = tuple(spec["hidden"])
        return MLPClassifier(**spec)
    if family == "conv":
        spec["channels"] = tuple(spec["channels"])
        return ConvClassifier(**spec)
    if family == "char_lm":
        spec["genres"] = tuple(spec.get("genres", data.TRAIN_GENRES))
        if spec.get("pretrain_genres"):
            spec["pretrain_genres"] = tuple(spec["pretrain_genres"])
        return CharTransformerLM(**spec)
    raise ValueError(f"cannot build a task of family {family!r} from a spec (pass a ModuleTask object instead)")


def _log_uniform(low: float, high: float, generator: torch.Generator) -> float:
    u = float(torch.rand((), generator=generator))
    return math.exp(math.log(low) + u * (math.log(high) - math.log(low)))


def _choice(options: Sequence[Any], generator: torch.Generator) -> Any:
    return options[int(torch.randint(0, len(options), (), generator=generator))]


def _int_log_uniform(bounds: Sequence[int], generator: torch.Generator) -> int:
    low, high = bounds
    return int(round(_log_uniform(low, high, generator)))


def sample_task_spec(families: Sequence[Mapping[str, Any]], generator: torch.Generator) -> dict[str, Any]:
    """Draw a task spec from a recipe's task distribution.

    ``families`` is a list of dicts with a ``family`` ("mlp" / "char_lm"), a sampling ``weight`` and ranges:

    - mlp: ``datasets`` (choice), ``width`` [lo, hi] (log-uniform int), ``depth`` [lo, hi] (hidden layers,
      uniform int), ``activations`` (choice), ``batch_sizes`` (choice), ``input_scale`` [lo, hi]
      (log-uniform), ``label_noise`` [lo, hi] (uniform);
    - char_lm: ``d_model`` (choice), ``layers`` [lo, hi], ``heads`` (choice), ``context`` (choice),
      ``batch_sizes`` (choice), ``genres`` (list).

    Fine-tuning episodes: with probability ``finetune_prob`` a family draws one pair from ``finetune_pairs``
    (``[source, target]`` datasets for mlp, genres for char_lm) and the task starts from a model pre-trained
    on the source (``pretrain_steps``, cached) and trains on the target.
    """
    weights = torch.tensor([float(f.get("weight", 1.0)) for f in families])
    family = families[int(torch.multinomial(weights, 1, generator=generator))]
    kind = family["family"]
    finetune = float(torch.rand((), generator=generator)) < float(family.get("finetune_prob", 0.0))
    if kind == "mlp":
        depth_low, depth_high = family.get("depth", [1, 2])
        depth = int(torch.randint(depth_low, depth_high + 1, (), generator=generator))
        width = family.get("width", [16, 64])
        noise_low, noise_high = family.get("label_noise", [0.0, 0.0])
        extra: dict[str, Any] = {}
        if finetune:  # fine-tune on ``dataset`` from a model pre-trained on ``source``
            source, dataset = _choice(family["finetune_pairs"], generator)
            extra = {"pretrain_dataset": source, "pretrain_steps": int(family.get("pretrain_steps", 300))}
        else:
            dataset = _choice(family.get("datasets", ["digits8"]), generator)
        spec = {
            "family": "mlp",
            "dataset": dataset,
            "hidden": [_int_log_uniform(width, generator) for _ in range(depth)],
            "activation": _choice(family.get("activations", ["relu"]), generator),
            "batch_size": int(_choice(family.get("batch_sizes", [64]), generator)),
            "input_scale": round(_log_uniform(*family.get("input_scale", [1.0, 1.0]), generator), 6),
            "label_noise": round(noise_low + float(torch.rand((), generator=generator)) * (noise_high - noise_low), 6),
        }
        return {**spec, **extra}
    if kind == "conv":
        depth_low, depth_high = family.get("depth", [2, 3])
        depth = int(torch.randint(depth_low, depth_high + 1, (), generator=generator))
        return {
            "family": "conv",
            "dataset": _choice(family.get("datasets", ["digits8"]), generator),
            "channels": [_int_log_uniform(family.get("channels", [8, 32]), generator) for _ in range(depth)],
            "activation": _choice(family.get("activations", ["relu"]), generator),
            "batch_size": int(_choice(family.get("batch_sizes", [64]), generator)),
        }
    if kind == "char_lm":
        layers_low, layers_high = family.get("layers", [1, 1])
        genres = list(family.get("genres", data.TRAIN_GENRES))
        extra = {}
        if finetune:  # fine-tune on one genre from a model pre-trained on another
            source, target = _choice(family["finetune_pairs"], generator)
            genres = [target]
            extra = {"pretrain_genres": [source], "pretrain_steps": int(family.get("pretrain_steps", 300))}
        spec = {
            "family": "char_lm",
            "d_model": int(_choice(family.get("d_model", [32]), generator)),
            "layers": int(torch.randint(layers_low, layers_high + 1, (), generator=generator)),
            "heads": int(_choice(family.get("heads", [2]), generator)),
            "context": int(_choice(family.get("context", [32]), generator)),
            "batch_size": int(_choice(family.get("batch_sizes", [16]), generator)),
            "genres": genres,
        }
        return {**spec, **extra}
    raise ValueError(f"unknown task family {kind!r}")


# ---- augmentation: weight reparametrization ----------------------------------------------------------


def sample_reparam_scales(
    params: Mapping[str, torch.Tensor], generator: torch.Generator, low: float, high: float
) -> dict[str, torch.Tensor]:
    """One scale ``s`` per copy and tensor, log-uniform in [low, high] (shape ``(n,)``)."""
    scales = {}
    for name, value in params.items():
        n = value.shape[0]
        u = torch.rand(n, generator=generator)
        scales[name] = torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    return scales


def reparametrize(params: Mapping[str, torch.Tensor], scales: Mapping[str, torch.Tensor], inverse: bool) -> Params:
    """Weight reparametrization: the optimizer trains ``θ = w/s`` and the model uses ``w = θ·s``.

    ``inverse=True`` maps w → θ (at init), ``inverse=False`` maps θ → w (inside the loss).
    """
    out = {}
    for name, value in params.items():
        s = scales[name].view(-1, *([1] * (value.dim() - 1)))
        out[name] = value / s if inverse else value * s
    return out
