"""End-to-end transformers.Trainer step time: learned optimizer vs AdamW, and the optimizer's share of the step.

For MiniLM full fine-tuning (22.7M trainable parameters) and SmolLM2-135M LoRA (r=8 on q/v), at several
batch sizes: median wall time of a whole Trainer step (forward, backward, clipping, optimizer, zero_grad)
and of `optimizer.step()` alone, measured with Trainer callbacks. As the batch grows, the gradient work grows
and the optimizer's share falls ("optimizer dilution": C_opt / C_grad → 0).

    python benchmarks/trainer_overhead.py [--quick] [--models minilm smollm2] [--out outputs/trainer_overhead.md]

Writes the markdown table to ``--out`` (default ``outputs/trainer_overhead.md``, outside the tracked tree) and
the plot next to it (``.png``). AdamW is Trainer's default optimizer (``adamw_torch_fused`` with this
transformers); the learned one is the shipped default rule on the default CPU back end (``fused``:
`optbundle.step.fused_step`; its first step includes the compile, and is not in the median). Muon is the
optimizer the rule generalizes, passed as ``Trainer(optimizers=(muon, None))``: ``torch.optim.Muon``
(``match_rms_adamw``, Newton–Schulz in fp32) on the hidden matrices and fused AdamW on the rest
(benchmarks/muon_baseline.py), so the learned step's overhead is stated against both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from optbundle import Bundle, load_rule
from optbundle.apps.finetune import DataArguments, ModelArguments, build_datasets, load_model, load_tokenizer

sys.path.append(str(Path(__file__).resolve().parent))  # run as a script it is already there
import muon_baseline  # noqa: E402


#: Steps left out of the medians: the first allocate state, warm caches and (learned) compile the fused kernels.
WARM = 2


class StepTimer(TrainerCallback):
    """Times each whole step (step begin → step end) and the optimizer step inside it."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.optimizer_times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._opt_start = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.optimizer_times.append(time.perf_counter() - self._opt_start)

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(time.perf_counter() - self._step_start)


def measure(model_args: ModelArguments, data_args: DataArguments, batch: int, steps: int, optimizer: str):
    tokenizer = load_tokenizer(model_args)
    train, _ = build_datasets(data_args, model_args, tokenizer)
    model = load_model(model_args, 0, tokenizer)
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding

    collator = (DataCollatorWithPadding(tokenizer, padding="max_length", max_length=data_args.max_length)
                if model_args.task == "sequence-classification" else DataCollatorForLanguageModeling(tokenizer, mlm=False))
    args = TrainingArguments(output_dir="outputs/overhead", max_steps=steps, per_device_train_batch_size=batch,
                             report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=10**6,
                             learning_rate=5e-5, lr_scheduler_type="constant", seed=0)
    kwargs = {}
    if optimizer == "learned":
        kwargs["optimizers"] = Bundle(model, load_rule("default")).optimizer(lr=0.05)
    elif optimizer == "muon":
        kwargs["optimizers"] = (muon_baseline.for_model(model, lr=args.learning_rate, fused=True), None)
    timer = StepTimer()
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator, callbacks=[timer], **kwargs)
    trainer.train()
    return statistics.median(timer.step_times[WARM:]), statistics.median(timer.optimizer_times[WARM:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and batch sizes")
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("outputs") / "trainer_overhead.md",
                        help="markdown report (the plot goes next to it as .png)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setups = {
        "minilm": (ModelArguments(model="minilm", task="sequence-classification", num_labels=2),
                   DataArguments(dataset="sms-spam", max_length=64, train_size=1024, eval_size=8),
                   [8, 32] if args.quick else [8, 16, 32, 64]),
        "smollm2": (ModelArguments(model="smollm2", task="causal-lm", lora_r=8),
                    DataArguments(dataset="shakespeare", max_length=128, train_size=64, eval_size=4),
                    [1, 4] if args.quick else [1, 2, 4, 8]),
    }
    steps = 5 if args.quick else 8
    rows = []
    for name in args.models:
        model_args, data_args, batches = setups[name]
        trainable = None
        for batch in batches:
            result = {}
            for optimizer in ("adamw", "muon", "learned"):
                result[optimizer] = measure(model_args, data_args, batch, steps, optimizer)
            if trainable is None:
                m = load_model(model_args, 0, load_tokenizer(model_args))
                trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
            (a_step, a_opt), (m_step, m_opt), (l_step, l_opt) = result["adamw"], result["muon"], result["learned"]
            rows.append(dict(model=name, trainable=trainable, batch=batch, adamw_step=a_step, adamw_opt=a_opt,
                             muon_step=m_step, muon_opt=m_opt, learned_step=l_step, learned_opt=l_opt))
            print(rows[-1], flush=True)
    lines = [
        f"Trainer step time on this machine ({torch.get_num_threads()} threads), median over steps {WARM + 1}..{steps} "
        f"(AdamW: Trainer's default, {TrainingArguments('outputs/overhead', use_cpu=True).optim.value}); "
        "`python benchmarks/trainer_overhead.py " + " ".join(sys.argv[1:]) + "` (machine shared with other jobs: "
        f"load average {os.getloadavg()[0]:.1f} at the end).",
        "",
        "| model | trainable params | batch | AdamW step s | Muon+AdamW step s | learned step s | overhead vs AdamW | "
        "overhead vs Muon | AdamW opt s | Muon+AdamW opt s | learned opt s | learned opt share of step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        overhead, versus_muon = r["learned_step"] / r["adamw_step"] - 1, r["learned_step"] / r["muon_step"] - 1
        lines.append(
            f"| {r['model']} | {r['trainable'] / 1e6:.2f}M | {r['batch']} | {r['adamw_step']:.3f} | {r['muon_step']:.3f} | "
            f"{r['learned_step']:.3f} | {overhead * 100:+.0f}% | {versus_muon * 100:+.0f}% | {r['adamw_opt']:.3f} | "
            f"{r['muon_opt']:.3f} | {r['learned_opt']:.3f} | {r['learned_opt'] / r['learned_step'] * 100:.0f}% |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in args.models:
        sub = [r for r in rows if r["model"] == name]
        ax.plot([r["batch"] for r in sub], [r["learned_opt"] / r["learned_step"] for r in sub], "o-", label=f"{name} learned")
        ax.plot([r["batch"] for r in sub], [r["muon_opt"] / r["muon_step"] for r in sub], "^:", label=f"{name} Muon+AdamW")
        ax.plot([r["batch"] for r in sub], [r["adamw_opt"] / r["adamw_step"] for r in sub], "s--", label=f"{name} AdamW")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("optimizer share of the Trainer step")
    ax.set_title("optimizer dilution")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
