"""Peak memory of full-model refinement: MiniLM (all 22.7M parameters trainable), 2 antithetic pairs.

    python benchmarks/refine_memory.py --threads 1 --out benchmarks/results/refine_memory.md

Runs ``Bundle.refine`` for ``--meta-steps`` meta-steps of PES with a short truncation (``--truncation`` inner
steps, the episode as long) on VADER Amazon snippets, with the default rule, and reports the process's peak
resident memory (``ru_maxrss``) before and after refinement, the wall time per meta-step, and the sizes of the
terms the unroll must hold (stacked copies, accumulators, gradients) next to the per-tensor step intermediates
(features ``(copies, F, N)`` and φ's hidden layer ``(copies, H, N)`` of the largest tensor, the word embedding).
The report goes to ``--out`` (default ``outputs/refine_memory.md``, outside the tracked tree).
"""

from __future__ import annotations

import argparse
import math
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from optbundle import Bundle, load_rule
from optbundle.step import reference
from optbundle.store import assets

GIB = 1024**3


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is KiB on Linux


def tokenized(tokenizer, texts: list[str], labels: list[int], max_length: int):
    from datasets import Dataset

    ds = Dataset.from_dict({"text": texts, "labels": labels})
    return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length), batched=True,
                  remove_columns=["text"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--truncation", type=int, default=2)
    parser.add_argument("--meta-steps", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--rule", default="default")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("outputs/refine_memory.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer  # heavy: loaded here

    path = assets.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    texts, scores = assets.vader_sentiment("amazonReviewSnippets")
    labels = [int(s > 0) for s in scores]
    train = tokenized(tokenizer, texts[:256], labels[:256], args.max_tokens)
    held_out = tokenized(tokenizer, texts[256:384], labels[256:384], args.max_tokens)
    rule = load_rule(args.rule)
    bundle = Bundle(model, rule, tokenizer=tokenizer)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    count = sum(p.numel() for p in params.values())
    before = peak_rss_gib()
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        refined = bundle.refine(train, held_out, meta_steps=args.meta_steps, truncation=args.truncation,
                                episode_length=[args.truncation, args.truncation], pairs=args.pairs,
                                trainable="last_layer", compare_steps=0, checkpoint_every=10**6, out_dir=out_dir,
                                threads=args.threads, progress=False, max_tokens=args.max_tokens)
        wall = time.perf_counter() - start
    peak = peak_rss_gib()
    assert refined is not None
    config = rule.config
    copies = 2 * args.pairs
    state = reference.init_state(config, (1,))
    state_floats = sum(v.numel() for k, v in state.items() if k != "step")
    largest_name, largest = max(params.items(), key=lambda kv: kv[1].numel())
    features = sum(config.feature_width(f) for f in config.features if f != "time")
    hidden = max(config.hidden_sizes)
    per_copy_set = copies * count * 4 / GIB
    terms = [
        ("stacked parameters (copies × params)", per_copy_set),
        (f"accumulators ({state_floats} floats per coordinate)", state_floats * per_copy_set),
        ("gradients", per_copy_set),
        (f"features (copies, F={features}, N) of `{largest_name}`", copies * features * largest.numel() * 4 / GIB),
        (f"φ hidden layer (copies, H={hidden}, N) of `{largest_name}`", copies * hidden * largest.numel() * 4 / GIB),
    ]
    lines = [
        "# Full-model refinement memory (MiniLM)",
        "",
        f"`python benchmarks/refine_memory.py --truncation {args.truncation} --meta-steps {args.meta_steps} "
        f"--pairs {args.pairs} --threads {args.threads}` on {platform.machine()}, torch {torch.__version__}.",
        f"MiniLM-L6 + fresh 2-class head, all {count / 1e6:.1f}M parameters trainable, rule `{args.rule}` "
        f"(hash {rule.content_hash()[:12]}), PES with {args.pairs} antithetic pairs ({copies} copies), truncation "
        f"{args.truncation}, batch 16, held-out batch 32, ≤ {args.max_tokens} tokens.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| peak RSS after loading model + data | {before:.2f} GiB |",
        f"| peak RSS after {args.meta_steps} meta-step(s) | **{peak:.2f} GiB** |",
        f"| wall time per meta-step | {wall / args.meta_steps:.1f} s |",
        "",
        "Sizes of the terms (fp32):",
        "",
        "| term | GiB |",
        "|---|---:|",
        *[f"| {name} | {size:.2f} |" for name, size in terms],
        "",
        f"Features and φ's hidden layers are computed in row blocks of at most {reference.CHUNK_ELEMENTS:,} elements "
        f"(`reference.CHUNK_ELEMENTS`, {reference.CHUNK_ELEMENTS * 4 / 2**20:.0f} MiB), two passes per tensor.",
        "",
    ]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    if not math.isfinite(peak):  # pragma: no cover
        raise SystemExit("no peak measured")


if __name__ == "__main__":
    main()
