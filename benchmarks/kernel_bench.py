"""Microbenchmark of the fused "steer, filter, pick" step.

Times, per (batch, vocab, dtype, routed pairs, mode): the Triton kernels, the
plain PyTorch chain and ``torch.compile`` of that chain; writes a CSV keyed by
device and versions, and a PNG.  Without a GPU it says so and times only the
PyTorch chain (on a reduced grid unless told otherwise).

Bytes counted (the denominator of the effective bandwidth) are those of one
ideal fused pass, whatever the implementation does:

    read  = B * V * w                    (base logits, w bytes per element)
          + pairs * 2 * R * V * w        (expert and anti-expert of R routed rows)
    write = B * 8                        (the int64 tokens)

Every row is routed to every pair here (R = B).  Top-p needs extra passes, so
its share of the copy bandwidth is lower by design; the figure shows how much.

Usage: python benchmarks/kernel_bench.py --out DIR [--batches 1 8] [--vocabs 32000]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxytune.sampling.reference import filter_scores, gumbel_noise  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOP_P = 0.9
SHOWN = ("batch", "vocab", "dtype", "pairs", "mode", "backend", "median_ms", "gbps",
         "speedup_vs_torch", "speedup_vs_compile")


def torch_chain(base, experts, antis, alphas, seeds, positions, vocab_size, mode):
    """The unfused chain: fuse in float32, then argmax, or filter and Gumbel-max."""
    fused = base[:, :vocab_size].float()
    for expert, anti, alpha in zip(experts, antis, alphas):
        fused = fused + alpha[:, None] * (expert[:, :vocab_size].float()
                                          - anti[:, :vocab_size].float())
    if mode == "greedy":
        return fused.argmax(dim=1)
    batch = base.shape[0]
    scores = filter_scores(fused, torch.zeros(batch, dtype=torch.long, device=base.device),
                           torch.full((batch,), TOP_P, device=base.device),
                           torch.zeros(batch, device=base.device))
    return (scores + gumbel_noise(seeds, positions, vocab_size)).argmax(dim=1)


def median_ms(fn, on_gpu, repeats):
    """Median wall time of ``fn`` in ms, after a discarded warm-up."""
    if on_gpu:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(device, on_gpu):
    """Measured device-to-device copy bandwidth (read + write bytes / time)."""
    size = (1 << 30) if on_gpu else (1 << 26)
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    ms = median_ms(lambda: target.copy_(source), on_gpu, repeats=10)
    return 2 * size / (ms * 1e-3) / 1e9


def bytes_moved(batch, vocab, element_bytes, pairs):
    read = batch * vocab * element_bytes + pairs * 2 * batch * vocab * element_bytes
    return read + batch * 8


def run_case(batch, vocab, dtype_name, pairs, mode, device, on_gpu, compile_it, repeats):
    """One grid point: a list of CSV rows, one per backend."""
    generator = torch.Generator(device=device).manual_seed(batch + vocab + pairs)
    dtype = DTYPES[dtype_name]
    make = lambda: (torch.randn(batch, vocab, generator=generator, device=device) * 3).to(dtype)
    base = make()
    experts = [make() for _ in range(pairs)]
    antis = [make() for _ in range(pairs)]
    alphas = [torch.full((batch,), 0.8, device=device) for _ in range(pairs)]
    seeds = torch.arange(batch, device=device)
    positions = torch.full((batch,), 17, device=device)
    args = (base, experts, antis, alphas, seeds, positions, vocab, mode)

    timings = {"torch": median_ms(lambda: torch_chain(*args), on_gpu, repeats)}
    if compile_it:
        torch._dynamo.reset()  # a fresh graph per case, clear of the recompile limit
        compiled = torch.compile(torch_chain, dynamic=False)
        compiled(*args)
        timings["compile"] = median_ms(lambda: compiled(*args), on_gpu, repeats)
    if on_gpu:
        from proxytune_kernels.steer_sample import SteerPair, sample_next_tokens

        rows = torch.arange(batch, dtype=torch.int32, device=device)
        steer = [SteerPair(e, a, rows, alpha) for e, a, alpha in zip(experts, antis, alphas)]
        knobs = dict(do_sample=mode == "top_p", top_p=TOP_P, seeds=seeds, positions=positions)
        timings["triton"] = median_ms(lambda: sample_next_tokens(base, vocab, steer, **knobs),
                                      on_gpu, repeats)

    moved = bytes_moved(batch, vocab, base.element_size(), pairs)
    return [
        dict(batch=batch, vocab=vocab, dtype=dtype_name, pairs=pairs, mode=mode,
             backend=backend, median_ms=round(ms, 4), bytes=moved,
             gbps=round(moved / (ms * 1e-3) / 1e9, 2),
             speedup_vs_torch=round(timings["torch"] / ms, 2),
             speedup_vs_compile=round(timings["compile"] / ms, 2) if "compile" in timings
             else "")
        for backend, ms in timings.items()
    ]


def plot(rows, copy_gbps, path):
    """Effective GB/s against batch at V = 128256 (or the largest timed), bf16, 1 pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vocab = 128256 if any(r["vocab"] == 128256 for r in rows) else max(r["vocab"] for r in rows)
    dtype = "bf16" if any(r["dtype"] == "bf16" for r in rows) else rows[0]["dtype"]
    pairs = 1 if any(r["pairs"] == 1 for r in rows) else rows[0]["pairs"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, mode in zip(axes, ("greedy", "top_p")):
        for backend in ("triton", "compile", "torch"):
            points = sorted((r["batch"], r["gbps"]) for r in rows
                            if (r["vocab"], r["dtype"], r["pairs"], r["mode"], r["backend"])
                            == (vocab, dtype, pairs, mode, backend))
            if points:
                axis.plot(*zip(*points), marker="o", label=backend)
        axis.axhline(copy_gbps, color="grey", linestyle="--", label="measured copy")
        axis.set(xscale="log", xlabel="batch", title=f"{mode}, V={vocab}, {dtype}, {pairs} pair")
        axis.legend()
    axes[0].set_ylabel("effective GB/s (one-pass bytes / time)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--vocabs", type=int, nargs="+")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    parser.add_argument("--pairs", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["greedy", "top_p"])
    parser.add_argument("--compile-vocabs", type=int, nargs="+", default=[32000, 128256],
                        help="torch.compile is timed only at these vocab sizes, batches "
                             "and pair counts, with the first dtype (compiling is slow)")
    parser.add_argument("--compile-batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--compile-pairs", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=5, help="CPU timing repeats")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    if on_gpu:
        device_name = torch.cuda.get_device_name(device)
        batches, vocabs = args.batches or [1, 8, 64, 256], args.vocabs or [32000, 128256, 262144]
        dtypes = args.dtypes or ["bf16", "fp32"]
    else:
        device_name = f"cpu ({platform.processor() or platform.machine()}, " \
                      f"{torch.get_num_threads()} threads)"
        print("No GPU: timing only the PyTorch paths (torch chain, torch.compile).")
        batches, vocabs = args.batches or [1, 8], args.vocabs or [32000]
        dtypes = args.dtypes or ["fp32"]
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"

    copy_gbps = copy_bandwidth_gbps(device, on_gpu)
    print(f"device: {device_name}; measured copy bandwidth {copy_gbps:.0f} GB/s")
    rows = []
    for vocab in vocabs:
        for batch in batches:
            for dtype_name in dtypes:
                for pairs in args.pairs:
                    for mode in args.modes:
                        compile_it = (vocab in args.compile_vocabs and dtype_name == dtypes[0]
                                      and batch in args.compile_batches
                                      and pairs in args.compile_pairs)
                        case_rows = run_case(batch, vocab, dtype_name, pairs, mode, device,
                                             on_gpu, compile_it, args.repeats)
                        for row in case_rows:
                            print(", ".join(f"{key}={row[key]}" for key in SHOWN))
                        rows += case_rows

    args.out.mkdir(parents=True, exist_ok=True)
    versions = dict(device=device_name, torch=torch.__version__, triton=triton_version,
                    cuda=torch.version.cuda or "none", python=platform.python_version(),
                    copy_gbps=round(copy_gbps, 1), date=time.strftime("%Y-%m-%d"))
    csv_path = args.out / "kernel_bench.csv"
    with open(csv_path, "w", newline="") as handle:
        fields = list(versions) + list(rows[0]) + ["share_of_copy"]
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**versions, **row,
                             "share_of_copy": round(row["gbps"] / copy_gbps, 3)})
    print(f"wrote {csv_path}")
    try:
        plot(rows, copy_gbps, args.out / "kernel_bench.png")
        print(f"wrote {args.out / 'kernel_bench.png'}")
    except ImportError as error:
        print(f"no plot: {error}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
