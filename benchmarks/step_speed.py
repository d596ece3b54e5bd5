"""Step time of the learned optimizer against torch AdamW, bytes per step and achieved bandwidth.

    python benchmarks/step_speed.py --device cpu --threads 1      # 1M, 10M, 50M parameters
    python benchmarks/step_speed.py --device cuda                 # 1M … 1B parameters, fused kernels
    python benchmarks/step_speed.py --device cpu --threads 1 --out benchmarks/results/step_speed_cpu_1thread.md

The report goes to ``--out`` (default ``outputs/step_speed_<device>.md``, outside the tracked tree).

For each tensor mix (``matrix``: one large matrix; ``transformer``: a GPT-like stack of many tensors) and
size it times ``LearnedOptimizer.step()`` (on CPU the back end ``OPTBUNDLE_BACKEND`` would pick, ``fused``
for the shipped default, or ``--backends``; on CUDA the fused Triton kernels, and the torch path too unless
``--skip-torch-on-cuda``) against ``torch.optim.AdamW`` (``foreach=True`` and ``fused=True``), interleaving
them so that load from other processes hits all alike, and reports medians. For rules that orthogonalize
matrices it also reports the time spent in Newton–Schulz inside the learned steps and, on the same tensors, the
batched iteration alone (``NS ms in step (alone)``: one
`reference.newton_schulz` per group of same-shaped matrices, as the fused back end runs it), NS's share of the
learned step, and the step of the Muon optimizer the rule generalizes on the same mix: ``torch.optim.Muon``
(``adjust_lr_fn="match_rms_adamw"``, Newton–Schulz in fp32 like the rule's: benchmarks/muon_baseline.py) on the
hidden matrices (the tensors the rule orthogonalizes) and ``torch.optim.AdamW`` (foreach) on the rest.

Peak extra memory of a step: the rise of the process's peak RSS over its RSS before the step
(``/proc/self/clear_refs`` resets the peak; run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed large
buffers go back to the OS and the next step's allocations show up).

Bytes: the memory a step *must* move with its state layout (AdamW: read p, g, m, v and write p, m, v;
learned: read p, g, K momenta, v (and full accumulators for rank < 2) and write them back, plus the small
row/column statistics), divided by the step time, against the device's measured copy bandwidth (a large
``copy_``, counted as read + write). The learned step's passes read some of it twice (see
kernels/learned_step.py and bundle/step/fast_step.py), so "achieved" is the useful bandwidth, not the bus load.
State bytes per parameter come from the optimizers' actual state tensors.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from optbundle import LearnedOptimizer, load_rule
from optbundle.step import fused_step, reference, vocabulary
from optbundle.step import optimizer as O
from optbundle.step.roles import assign_roles, is_orthogonalized

sys.path.append(str(Path(__file__).resolve().parent))  # run as a script it is already there
from muon_baseline import MUON_ROLES, MuonAdamW  # noqa: E402  (also: Muon's Newton–Schulz in fp32 on CPU)

CPU_SIZES = [1_000_000, 10_000_000, 50_000_000]
CUDA_SIZES = [1_000_000, 10_000_000, 100_000_000, 1_000_000_000]
TORCH_PATH_ON_CUDA_MAX = 100_000_000  # the chunked torch path launches ~50 small kernels per 128K elements


# ---- tensor mixes -------------------------------------------------------------------------------------


def matrix_shapes(target: int) -> list[tuple[int, ...]]:
    cols = 4096 if target >= 4096 * 64 else 1024
    return [(max(1, round(target / cols)), cols)]


def transformer_shapes(target: int) -> list[tuple[int, ...]]:
    """Embedding (4d × d), L layers of (qkv, out, fc1, fc2 + biases + 2 LayerNorms), final LayerNorm.
    ``L = 12`` and ``d`` (a multiple of 64) chosen so the total is close to ``target``."""
    layers = 12
    d = max(64, 64 * round(math.sqrt(target / (12 * layers + 4)) / 64))
    shapes: list[tuple[int, ...]] = [(4 * d, d)]
    for _ in range(layers):
        shapes += [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,), (d,), (d,)]
    shapes += [(d,), (d,)]
    return shapes


MIXES = {"matrix": matrix_shapes, "transformer": transformer_shapes}


# ---- measurements -------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, numel: int = 1 << 26, repeats: int = 7) -> float:
    """Bytes per second of ``dst.copy_(src)`` (fp32, 256 MB), counting the read and the write."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def make_params(shapes, device, dtype, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=generator, device=device) * 0.02).to(dtype))
        p.grad = (torch.randn(shape, generator=generator, device=device) * 1e-3).to(dtype)
        params.append(p)
    return params


def timed_step(opt, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    opt.step()
    synchronize(device)
    return time.perf_counter() - start


def state_bytes(opt, params) -> int:
    total = 0
    for p in params:
        for value in opt.state[p].values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def must_move_bytes_adamw(shapes, param_bytes: int) -> int:
    numel = sum(math.prod(s) for s in shapes)
    return numel * (2 * param_bytes + param_bytes + 4 * 4)  # p r/w, g r, m r/w, v r/w


def must_move_bytes_learned(config, shapes, param_bytes: int) -> int:
    k, j = len(config.momentum_decays), len(config.factored_decays)
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        total += n * (2 * param_bytes + param_bytes + 4 * 2 * (k + 1))  # p r/w, g r, momenta and v r/w
        if vocabulary.is_factored(shape):
            lead = n // (shape[-1] * shape[-2])
            total += 4 * 2 * j * lead * (shape[-1] + shape[-2])
        else:
            total += 4 * 2 * j * n  # full accumulators r/w
    return total


def fmt_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if b < 1024:
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.2f} TB"


def _rss_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_extra_bytes(opt, device) -> float | None:
    """Peak RSS during one ``opt.step()`` minus the RSS before it (CPU, Linux); ``None`` elsewhere."""
    if device.type != "cpu":
        return None
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
    except OSError:
        return None
    before = _rss_kb("VmRSS")
    opt.step()
    peak = _rss_kb("VmHWM")
    return None if before is None or peak is None else 1024.0 * max(0, peak - before)


def newton_schulz_seconds(config, shapes, roles, device, repeats) -> float | None:
    """Median time of the batched Newton–Schulz iterations a step of this mix runs (fused back end), or None."""
    groups: dict[tuple[int, int], int] = {}
    for shape, role in zip(shapes, roles):
        if config.output == "hybrid_residual" and is_orthogonalized(config, role, shape):
            key = (shape[0], math.prod(shape[1:]))
            groups[key] = groups.get(key, 0) + 1
    if not groups:
        return None
    batches = [torch.randn((count, *key), device=device) for key, count in groups.items()]
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for batch in batches:
            reference.newton_schulz(batch, config)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_case(mix, target, rule, device, dtype, backends, repeats, warmup, muon=True):
    shapes = MIXES[mix](target)
    numel = sum(math.prod(s) for s in shapes)
    param_bytes = torch.empty((), dtype=dtype).element_size()
    baselines = {}
    for name, kwargs in (("adamw", dict(foreach=True)), ("adamw_fused", dict(fused=True))):
        params = make_params(shapes, device, dtype)
        baselines[name] = (params, torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, **kwargs))
    hidden = [role in MUON_ROLES and len(s) == 2 for s, role in zip(shapes, assign_roles([(None, s) for s in shapes]))]
    if muon and any(hidden) and hasattr(torch.optim, "Muon"):
        params = make_params(shapes, device, dtype)
        baselines["muon"] = (params, MuonAdamW([p for p, h in zip(params, hidden) if h],
                                               [p for p, h in zip(params, hidden) if not h], lr=0.02, foreach=True))
    learned = {}
    for backend in backends:
        params = make_params(shapes, device, dtype)
        learned[backend] = (params, LearnedOptimizer(params, rule, lr=rule.config.recommended_lr["scratch"],
                                                     weight_decay=0.01))
    previous = os.environ.get(O.BACKEND_ENV)
    times: dict[str, list[float]] = {**{b: [] for b in baselines}, **{b: [] for b in backends}}
    ns_in_step: dict[str, list[float]] = {b: [] for b in backends}
    first_step: dict[str, float] = {}
    peak: dict[str, float | None] = {}
    try:
        for i in range(warmup + repeats):
            for name, (_, opt) in baselines.items():
                t = timed_step(opt, device)
                if i >= warmup:
                    times[name].append(t)
            for backend, (params, opt) in learned.items():
                os.environ[O.BACKEND_ENV] = backend
                ns_before = fused_step.NEWTON_SCHULZ_SECONDS[0]
                t = timed_step(opt, device)
                if i == 0:
                    first_step[backend] = t
                if i >= warmup:
                    times[backend].append(t)
                    ns_in_step[backend].append(fused_step.NEWTON_SCHULZ_SECONDS[0] - ns_before)
        for backend, (params, opt) in learned.items():
            os.environ[O.BACKEND_ENV] = backend
            peak[backend] = peak_extra_bytes(opt, device)
        peak["adamw"] = peak_extra_bytes(baselines["adamw"][1], device)
    finally:
        if previous is None:
            os.environ.pop(O.BACKEND_ENV, None)
        else:
            os.environ[O.BACKEND_ENV] = previous
    roles = next(iter(learned.values()))[1].param_groups[0]["roles"] if learned else []
    row = {
        "mix": mix,
        "tensors": len(shapes),
        "params": numel,
        "adamw_s": statistics.median(times["adamw"]),
        "adamw_fused_s": statistics.median(times["adamw_fused"]),
        "muon_s": statistics.median(times["muon"]) if "muon" in times else None,
        "ns_s": newton_schulz_seconds(rule.config, shapes, roles, device, max(1, min(repeats, 3))),
        "adamw_bytes": must_move_bytes_adamw(shapes, param_bytes),
        "adamw_state": state_bytes(*baselines["adamw"][::-1]) / numel,
        "adamw_peak": peak["adamw"],
        "learned": {},
    }
    for backend, (params, opt) in learned.items():
        skipped = sum(int(opt.state[p]["skipped_steps"]) for p in params)
        row["learned"][backend] = {
            "s": statistics.median(times[backend]),
            "first_s": first_step[backend],
            "bytes": must_move_bytes_learned(rule.config, shapes, param_bytes),
            "state": state_bytes(opt, params) / numel,
            "peak": peak[backend],
            "ns_s": statistics.median(ns_in_step[backend]) if backend == "fused" else None,
            "skipped": skipped,
        }
    del baselines, learned
    return row


# ---- report -------------------------------------------------------------------------------------------


def _ms(seconds) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.1f}"


def _mb(b) -> str:
    return "–" if b is None else f"{b / 2**20:.0f} MB"


def table(rows, copy_bw, rule_name, device) -> str:
    lines = [
        f"| mix | tensors | params | AdamW foreach ms | AdamW fused ms | learned ({rule_name}) | ms | × foreach | "
        "× fused | NS ms in step (alone) | NS share | learned − NS ms (× foreach) | Muon+AdamW ms | × Muon | "
        "learned GB/s (% copy) | state B/param learned · AdamW | peak extra learned · AdamW |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        for backend, res in row["learned"].items():
            bw = res["bytes"] / res["s"]
            rest, ns, share = "–", row["ns_s"], "–"
            if res["ns_s"]:  # measured inside the learned steps themselves
                ns = res["ns_s"]
                rest = f"{(res['s'] - ns) * 1e3:.1f} ({(res['s'] - ns) / row['adamw_s']:.2f})"
                share = f"{100 * ns / res['s']:.0f}%"
            versus_muon = "–" if row["muon_s"] is None else f"{res['s'] / row['muon_s']:.2f}"
            lines.append(
                f"| {row['mix']} | {row['tensors']} | {row['params'] / 1e6:.1f}M | {_ms(row['adamw_s'])} | "
                f"{_ms(row['adamw_fused_s'])} | {backend} | {_ms(res['s'])} | **{res['s'] / row['adamw_s']:.2f}** | "
                f"{res['s'] / row['adamw_fused_s']:.2f} | {_ms(ns)} ({_ms(row['ns_s'])}) | {share} | {rest} | {_ms(row['muon_s'])} | "
                f"{versus_muon} | "
                f"{bw / 1e9:.1f} ({100 * bw / copy_bw:.0f}%) | {res['state']:.1f} · {row['adamw_state']:.1f} | "
                f"{_mb(res['peak'])} · {_mb(row['adamw_peak'])} |"
            )
    return "\n".join(lines)


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.1f}"
    return (
        f"{name}; {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads{load}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=float, nargs="+", help="parameter counts (default: 1M 10M 50M on CPU, up to 1B on CUDA)")
    parser.add_argument("--mixes", nargs="+", default=list(MIXES), choices=list(MIXES))
    parser.add_argument("--rules", nargs="+", default=["default"], help="shipped rule names or rule directories")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (CPU); default: torch's")
    parser.add_argument("--skip-torch-on-cuda", action="store_true", help="on CUDA, time only the fused kernels")
    parser.add_argument("--out", type=Path, help="write the markdown report here (default outputs/step_speed_<device>.md)")
    parser.add_argument("--backends", nargs="+", choices=O.BACKENDS, help="learned back ends to time (default: the "
                        "one OPTBUNDLE_BACKEND would pick on CPU, fused for the shipped default; triton on CUDA)")
    parser.add_argument("--no-muon", action="store_true", help="skip the Muon (+ AdamW) baseline")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    sizes = [int(s) for s in (args.sizes or (CUDA_SIZES if device.type == "cuda" else CPU_SIZES))]
    if args.backends:
        backends = args.backends
    elif device.type == "cpu":
        backends = ["fused"]  # the path the default back end takes for large tensors of the shipped rule
    else:
        backends = ["triton"] if args.skip_torch_on_cuda else ["triton", "torch"]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    header = [f"# Learned step vs AdamW on {args.device}", "", f"- machine: {machine_line(device)}"]
    copy_bw = copy_bandwidth(device)
    header.append(f"- measured copy bandwidth: {copy_bw / 1e9:.1f} GB/s (read + write of a 256 MB fp32 copy)")
    header.append(
        f"- parameters and gradients {args.dtype}; median of {args.repeats} steps after {args.warmup} warm-up steps, "
        "AdamW and learned steps interleaved"
    )
    header.append(f"- command: `python {' '.join(['benchmarks/step_speed.py', *sys.argv[1:]])}` (started {started})")
    print("\n".join(header), flush=True)
    report = header[:]
    for rule_name in args.rules:
        rule = load_rule(rule_name)
        c = rule.config
        description = (
            f"`{rule_name}`: {c.num_inputs} inputs, hidden {c.hidden_sizes}, output {c.output}"
            f"{', param_scale' if c.param_scale else ''}"
        )
        rows = []
        for mix in args.mixes:
            for size in sizes:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                chosen = [b for b in backends if not (device.type == "cuda" and b == "torch" and size > TORCH_PATH_ON_CUDA_MAX)]
                row = bench_case(mix, size, rule, device, dtype, chosen, args.repeats, args.warmup, not args.no_muon)
                rows.append(row)
                for backend, res in row["learned"].items():
                    print(
                        f"  {rule_name} {mix} {row['params'] / 1e6:.1f}M {backend}: {res['s'] * 1e3:.1f} ms "
                        f"(first step {res['first_s'] * 1e3:.0f} ms, skipped {res['skipped']}) vs AdamW "
                        f"{row['adamw_s'] * 1e3:.1f} ms (fused {row['adamw_fused_s'] * 1e3:.1f}), NS {_ms(row['ns_s'])} ms, "
                        f"Muon+AdamW {_ms(row['muon_s'])} ms",
                        flush=True,
                    )
        text = table(rows, copy_bw, rule_name, device)
        report += ["", f"## rule {description}", "", text]
        print("\n" + report[-3] + "\n\n" + text + "\n", flush=True)
    report.append("")
    report.append(f"- finished {time.strftime('%Y-%m-%d %H:%M:%S')}; machine at the end: {machine_line(device)}")
    out = args.out or Path("outputs") / f"step_speed_{device.type}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(report) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
