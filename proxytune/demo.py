"""``proxytune demo``: the embedded family answering a few mixed prompts.

Each prompt goes through the shipped cluster router, which picks the expert
pair (or none); the demo then shows the base alone, the chosen small expert
alone and the proxy-tuned base side by side, next to the true answer.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from typing import TextIO

import torch

from proxytune.engine import ProxyTunedModel
from proxytune.experiments.alignment import (
    base_signal,
    chat_texts,
    generate_replies,
    load_cluster_router,
    plain_generate,
    steered_generate,
)
from proxytune.loading.embedded import load_embedded_family
from proxytune.experiments.world import DOMAINS, EMBEDDED_WORLD, generate_world

logger = logging.getLogger(__name__)

DEMO_TOKENS = 8


def demo_examples(world, per_domain: int = 3, seed: int = 0):
    """A fixed, shuffled handful of test prompts (held-out people) from every domain."""
    rng = random.Random(f"demo-{seed}")
    examples = [e for d in DOMAINS
                for e in rng.sample(world.chat_examples(d, "test"), per_domain)]
    rng.shuffle(examples)
    return examples


@torch.no_grad()
def run_demo(stream: TextIO = sys.stdout, per_domain: int = 3, seed: int = 0) -> list[dict]:
    """Write the side-by-side table to ``stream``; return its rows as dicts."""
    started = time.time()
    family = load_embedded_family()
    tokenizer = family.tokenizer
    world = generate_world(**EMBEDDED_WORLD)
    proxy = ProxyTunedModel(family.base, list(family.pairs.values()), tokenizer=tokenizer)
    router = load_cluster_router(family, world, seed)

    examples = demo_examples(world, per_domain, seed)
    texts = chat_texts(tokenizer, [e.prompt for e in examples])
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    hidden = family.base(**batch, output_hidden_states=True).hidden_states
    signal = base_signal(family)
    choices = [name for name, _ in router.route_names(
        signal.pool(hidden[signal.layer], batch["attention_mask"]))]

    def replies(generate):
        return generate_replies(generate, tokenizer, texts, DEMO_TOKENS, show_progress=False)

    base_alone = replies(plain_generate(family.base, tokenizer))
    proxied = replies(steered_generate(proxy, lambda rows: {"router": router}))
    expert_alone = []
    for row, choice in enumerate(choices):
        if choice is None:
            expert_alone.append("(no expert)")
            continue
        single = generate_replies(plain_generate(family.pairs[choice].expert, tokenizer),
                                  tokenizer, [texts[row]], DEMO_TOKENS, show_progress=False)
        expert_alone.append(single[0])

    rows = [
        {"prompt": e.prompt, "answer": e.answer, "router": choice or "none",
         "base": b, "expert": x, "proxy": p}
        for e, choice, b, x, p in zip(examples, choices, base_alone, expert_alone, proxied)
    ]
    write_table(rows, stream)
    hits = {key: sum(r[key] == r["answer"] for r in rows) for key in ("base", "expert", "proxy")}
    stream.write(
        f"\nexact matches out of {len(rows)}: base {hits['base']}, expert {hits['expert']}, "
        f"proxy-tuned {hits['proxy']}   ({time.time() - started:.1f} s, CPU)\n"
        "The base knows the facts but not the terse chat format; the small expert knows "
        "the format\nbut fewer facts; proxy-tuning adds (expert - anti-expert) to the "
        "base's logits.\n"
    )
    return rows


def write_table(rows: list[dict], stream: TextIO) -> None:
    """Fixed-width columns, long cells cut with an ellipsis."""
    columns = [("prompt", "prompt", 34), ("router", "router", 7), ("base", "base alone", 30),
               ("expert", "expert alone", 14), ("proxy", "proxy-tuned", 12),
               ("answer", "true answer", 11)]

    def cell(text: str, width: int) -> str:
        text = text if len(text) <= width else text[:width - 1] + "\u2026"
        return text.ljust(width)

    stream.write("  ".join(cell(title, width) for _, title, width in columns).rstrip() + "\n")
    stream.write("  ".join("-" * width for _, _, width in columns) + "\n")
    for row in rows:
        stream.write("  ".join(cell(row[key], width) for key, _, width in columns).rstrip()
                     + "\n")
