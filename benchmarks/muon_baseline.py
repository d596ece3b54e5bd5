"""The Muon baseline of the benchmarks: ``torch.optim.Muon`` on hidden matrices + ``torch.optim.AdamW`` elsewhere.

Used by heldout.py (quality), step_speed.py and trainer_overhead.py (cost). On CPU, importing this module
switches Muon's Newton–Schulz to fp32 (`use_fp32_newton_schulz`): torch runs it in bf16, which CPUs here have
no matrix units for (bf16 made Muon ≈ 5× slower per step on MiniLM); the learned rule's own Newton–Schulz is
fp32 too, so the two steps compare like for like.
"""

from __future__ import annotations

import torch

#: Muon's (and the learned rule's) hidden-matrix roles: without adapters Muon would equal AdamW on LoRA tasks.
MUON_ROLES = ("matrix", "adapter")


def _newton_schulz_fp32(grad, ns_coefficients, ns_steps, eps):
    """torch.optim.Muon's Newton–Schulz, the same iteration, in fp32 instead of bf16."""
    a, b, c = ns_coefficients
    x = grad.float()
    transpose = x.size(0) > x.size(1)
    if transpose:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if transpose else x).to(grad.dtype)


def use_fp32_newton_schulz() -> None:
    """Make ``torch.optim.Muon`` orthogonalize in fp32 (process-wide; a no-op where CUDA is available)."""
    if not torch.cuda.is_available():
        import torch.optim._muon as _muon

        _muon._zeropower_via_newtonschulz = _newton_schulz_fp32


use_fp32_newton_schulz()


class MuonAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` (``adjust_lr_fn="match_rms_adamw"``) on ``matrices`` (2-D) + ``torch.optim.AdamW``
    (``adamw_kwargs``, e.g. ``fused=True``) on ``others``, same lr and weight decay; stepped together as one
    optimizer (a real `torch.optim.Optimizer`, so transformers' Trainer and LR schedulers accept it)."""

    def __init__(self, matrices: list[torch.Tensor], others: list[torch.Tensor], lr: float,
                 weight_decay: float = 0.01, **adamw_kwargs) -> None:
        self.parts: list[torch.optim.Optimizer] = []
        if matrices:
            self.parts.append(torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"))
        if others:
            self.parts.append(torch.optim.AdamW(others, lr=lr, weight_decay=weight_decay, **adamw_kwargs))
        super().__init__([{"params": list(matrices) + list(others)}], dict(lr=lr, weight_decay=weight_decay))
        self.param_groups = [group for part in self.parts for group in part.param_groups]  # schedulers set lr here

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss

    def state_dict(self):
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict) -> None:
        for part, saved in zip(self.parts, state_dict["parts"]):
            part.load_state_dict(saved)


def for_model(model: torch.nn.Module, lr: float, weight_decay: float = 0.01, **adamw_kwargs) -> MuonAdamW:
    """`MuonAdamW` over ``model``'s trainable parameters: Muon on the 2-D ones whose role
    (`optbundle.store.bundle.model_roles`, as the learned optimizer assigns them) is in `MUON_ROLES`."""
    from optbundle.store.bundle import model_roles

    roles = model_roles(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [roles[n] in MUON_ROLES and p.dim() == 2 for n, p in named]
    return MuonAdamW([p for (_, p), h in zip(named, hidden) if h], [p for (_, p), h in zip(named, hidden) if not h],
                     lr, weight_decay, **adamw_kwargs)
