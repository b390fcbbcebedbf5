"""Tokens per second of proxy-tuned generation against its baselines.

(a) Hugging Face generate() on the base alone
(b) proxytune with no expert
(c) proxytune with one expert pair
(d) a plain loop without KV caches, re-reading the whole sequence each step
    with all three models, as the original DExperts code does
(e) each of the three models alone through generate(); one proxy-tuned
    token costs one token of each, so (e) implies 1 / (1/a + 1/e1 + 1/e2)

Randomly initialised Llama models of fixed size, greedy decoding forced to
the full length.  Reports medians of interleaved repeats after a discarded warm-up,
ratios against the baselines of the same run, and writes CSV.

    python benchmarks/generate_bench.py --out results/generate_bench.csv
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from proxytune import ExpertPair, ProxyTunedModel


def make_model(seed: int, hidden: int, layers: int, vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
        num_key_value_heads=max(hidden // 128, 1), pad_token_id=0, bos_token_id=1,
        eos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def plain_loop(base, expert, anti, input_ids, new_tokens, alpha=1.0):
    """DExperts-style: every model re-reads the whole sequence, no cache."""
    sequence = input_ids
    for _ in range(new_tokens):
        fused = base(sequence).logits[:, -1].float()
        fused += alpha * (expert(sequence).logits[:, -1] - anti(sequence).logits[:, -1])
        sequence = torch.cat([sequence, fused.argmax(-1, keepdim=True)], dim=-1)
    return sequence


def median_seconds(runs: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each run, timed in interleaved rounds after a warm-up.

    Interleaving spreads any drift of the machine's load over every run alike.
    """
    for run in runs.values():
        run()  # warm-up, discarded
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--base-hidden", type=int, default=512)
    parser.add_argument("--base-layers", type=int, default=8)
    parser.add_argument("--expert-hidden", type=int, default=256)
    parser.add_argument("--expert-layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-plain", action="store_true", help="skip the slow loop (d)")
    parser.add_argument("--out", default="results/generate_bench.csv")
    args = parser.parse_args()

    base = make_model(0, args.base_hidden, args.base_layers, args.vocab)
    expert = make_model(1, args.expert_hidden, args.expert_layers, args.vocab)
    anti = make_model(2, args.expert_hidden, args.expert_layers, args.vocab)
    torch.manual_seed(3)
    input_ids = torch.randint(3, args.vocab, (args.batch, args.prompt_length))
    attention_mask = torch.ones_like(input_ids)
    settings = dict(attention_mask=attention_mask, max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    steered = ProxyTunedModel(base, [ExpertPair("e", expert, anti)])
    unsteered = ProxyTunedModel(base)
    runs = {
        "a_hf_base": lambda: base.generate(input_ids, **settings),
        "b_proxytune_no_expert": lambda: unsteered.generate(input_ids, **settings),
        "c_proxytune_one_pair": lambda: steered.generate(input_ids, expert="e", **settings),
        "e_hf_expert": lambda: expert.generate(input_ids, **settings),
        "e_hf_anti_expert": lambda: anti.generate(input_ids, **settings),
    }
    if not args.skip_plain:
        runs["d_plain_loop_no_cache"] = lambda: plain_loop(
            base, expert, anti, input_ids, args.new_tokens)

    tokens = args.batch * args.new_tokens
    rate = {name: tokens / seconds
            for name, seconds in median_seconds(runs, args.repeats).items()}
    for name, value in rate.items():
        print(f"{name:24s} {value:10.1f} tokens/s")

    implied = 1 / (1 / rate["a_hf_base"] + 1 / rate["e_hf_expert"]
                   + 1 / rate["e_hf_anti_expert"])
    ratios = {
        "b_over_a": rate["b_proxytune_no_expert"] / rate["a_hf_base"],
        "c_over_e_implied": rate["c_proxytune_one_pair"] / implied,
    }
    if "d_plain_loop_no_cache" in rate:
        ratios["c_over_d"] = rate["c_proxytune_one_pair"] / rate["d_plain_loop_no_cache"]
    print(f"{'e_implied_three_models':24s} {implied:10.1f} tokens/s")
    for name, value in ratios.items():
        print(f"{name:24s} {value:10.3f}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = dict(machine=platform.machine(), processor=platform.processor() or "cpu",
                   threads=torch.get_num_threads(), torch=torch.__version__,
                   transformers=transformers.__version__)
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["metric", "value", *machine])
        for name, value in {**rate, "e_implied_three_models": implied, **ratios}.items():
            writer.writerow([name, f"{value:.4f}", *machine.values()])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
