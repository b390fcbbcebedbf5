"""Rebuild the embedded model family from scratch: world, tokenizer, models, hashes.

    python examples/build_family.py                      # into proxytune/embedded/
    python examples/build_family.py --out /tmp/family --threads 2
    python examples/build_family.py --cache /tmp/pretrained   # keep pre-trained weights

Steps, each seeded:

1. generate the synthetic world (:mod:`proxytune.experiments.world`) and train a
   word-level tokenizer on its texts;
2. pre-train the base (Llama, ~1.8M parameters) on the whole corpus and one
   small model (~0.26M parameters) on the documents of the fine-tuning people
   only (the held-out people appear there by name, without their facts); the
   small model is the untuned anti-expert of every domain;
3. per domain, fine-tune a copy of the small model on the domain's chat data
   (the expert) and a copy of the base on the same data (the directly tuned
   base, the experiments' upper reference);
4. save everything in float16 safetensors with the tokenizer;
5. choose each pair's steering strength (alpha) on the validation prompts,
   into ``steering.json``;
6. fit the cluster router on calibration prompts with the saved base's
   hidden states, into ``router/``; then write ``hashes.json`` (sha256 of
   every shipped file) and ``build.json`` (settings, timings, quick scores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from proxytune.experiments.alignment import choose_alphas, fit_cluster_router
from proxytune.loading.embedded import load_embedded_family
from proxytune.experiments.world import (
    ATTRIBUTES,
    DOMAINS,
    EMBEDDED_WORLD,
    format_chat,
    generate_world,
    train_tokenizer,
)

EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "proxytune" / "embedded"

BASE_SHAPE = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4)
SMALL_SHAPE = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4)
PRETRAIN = dict(steps=1400, batch_size=32, seq_len=64, lr=3e-3, warmup=50)
SMALL_PRETRAIN = dict(steps=600, batch_size=32, seq_len=64, lr=3e-3, warmup=50)
# The small models read about the fine-tuning people and this share of the
# held-out people only: a smaller model trained on less text, which knows
# fewer facts than the base (World.small_model_people).
SMALL_HELDOUT_SHARE = 0.0
# One recipe for the small expert and the directly tuned base alike.  Chosen
# once among 5/3/2 epochs at lr 5e-4 to 1e-4 as the one whose directly tuned
# base scored best; the gentler recipe also forgets less of the pre-training.
FINETUNE = dict(epochs=3, batch_size=16, lr=2e-4)


def new_model(tokenizer, shape: dict, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=128, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **shape,
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(model, tokenizer, documents: list[str], steps: int, batch_size: int,
             seq_len: int, lr: float, warmup: int, seed: int, name: str) -> list[float]:
    """Next-token training on the packed corpus; documents are reshuffled every pass.

    Each pass over the corpus shuffles the documents into one stream
    ``<s> doc <s> doc ...`` cut into windows of ``seq_len`` tokens; a step
    reads the next ``batch_size`` windows.
    """
    rng = random.Random(seed)
    encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01,
                                  betas=(0.9, 0.98))
    model.train()
    losses = []
    windows_left: list[torch.Tensor] = []

    for step in range(steps):
        if len(windows_left) < batch_size:
            order = list(range(len(encoded)))
            rng.shuffle(order)
            stream = torch.tensor([t for i in order for t in [bos] + encoded[i]])
            usable = stream.numel() // seq_len * seq_len
            windows_left += list(stream[:usable].view(-1, seq_len))
        windows = torch.stack(windows_left[:batch_size])
        windows_left = windows_left[batch_size:]

        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        loss = model(input_ids=windows, labels=windows).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"  [{name}] step {step:4d}/{steps}  loss {loss.item():.3f}", flush=True)
    model.eval()
    return losses


def chat_batches(tokenizer, examples, batch_size: int, rng: random.Random):
    """Right-padded chat batches with labels on the answer and ``<|end|>`` only."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start:start + batch_size]]
        prompts = tokenizer([format_chat(e.prompt) for e in chunk],
                            add_special_tokens=False)["input_ids"]
        full = tokenizer([format_chat(e.prompt, e.answer) for e in chunk],
                         add_special_tokens=False)["input_ids"]
        width = max(map(len, full))
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (prompt, ids) in enumerate(zip(prompts, full)):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids)] = 1
            labels[row, len(prompt):len(ids)] = torch.tensor(ids[len(prompt):])
        yield input_ids, mask, labels


def finetune(model, tokenizer, examples, epochs: int, batch_size: int, lr: float,
             seed: int, name: str) -> None:
    """Supervised chat tuning of every weight, loss on the answers only."""
    rng = random.Random(seed)
    steps = epochs * math.ceil(len(examples) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    step = 0
    for epoch in range(epochs):
        total = 0.0
        for input_ids, mask, labels in chat_batches(tokenizer, examples, batch_size, rng):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup=10)
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            total += loss.item()
            step += 1
        print(f"  [{name}] epoch {epoch + 1}/{epochs}  mean loss "
              f"{total / math.ceil(len(examples) / batch_size):.3f}", flush=True)
    model.eval()


@torch.no_grad()
def next_word_accuracy(model, tokenizer, prompts: list[str], answers: list[str]) -> float:
    """Share of prompts whose greedy next token is the answer word (a quick check)."""
    hits = 0
    for start in range(0, len(prompts), 64):
        chunk = prompts[start:start + 64]
        batch = tokenizer(chunk, add_special_tokens=False, padding=True, return_tensors="pt")
        logits = model(**batch).logits[:, -1]
        predicted = tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        hits += sum(p == a for p, a in zip(predicted, answers[start:start + 64]))
    return hits / len(prompts)


@torch.no_grad()
def chat_accuracy(model, tokenizer, examples) -> float:
    """Exact match of a two-token greedy reply ``answer <|end|>`` (a quick check)."""
    prompts = [format_chat(e.prompt) for e in examples]
    answers = [e.answer for e in examples]
    first = next_word_accuracy(model, tokenizer, prompts, answers)
    follow = [p + " " + a for p, a in zip(prompts, answers)]
    ends = next_word_accuracy(model, tokenizer, follow, [tokenizer.eos_token] * len(follow))
    return min(first, ends)


def quick_scores(model, tokenizer, world) -> dict:
    probes = world.knowledge_probes()
    scores = {"knowledge": next_word_accuracy(model, tokenizer, [p.prompt for p in probes],
                                              [p.answer for p in probes])}
    for domain in DOMAINS:
        scores[domain] = chat_accuracy(model, tokenizer, world.chat_examples(domain, "heldout"))
    return {k: round(v, 3) for k, v in scores.items()}


def pretrained_once(tokenizer, shape: dict, documents: list[str], settings: dict, seed: int,
                    name: str, cache: Path | None) -> tuple[LlamaForCausalLM, bool]:
    """A new model pre-trained on ``documents``, or its float32 copy from ``cache``.

    Returns the model and whether it came from the cache.

    The cache file is keyed by everything the training depends on (shape,
    settings, seed, vocabulary, corpus), so a hit holds the very weights a
    fresh run would train: later steps can be redone without pre-training.
    """
    model = new_model(tokenizer, shape, seed=seed)
    key = hashlib.sha256(json.dumps(
        [shape, settings, seed, tokenizer.get_vocab(), documents, torch.__version__],
        sort_keys=True).encode()).hexdigest()[:16]
    cached = cache / f"{name}-{key}.pt" if cache is not None else None
    if cached is not None and cached.is_file():
        print(f"  [{name}] pre-trained weights from {cached}", flush=True)
        model.load_state_dict(torch.load(cached, weights_only=True))
        model.eval()
        return model, True
    pretrain(model, tokenizer, documents, **settings, seed=seed, name=name)
    if cached is not None:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cached)
    return model, False


def save_model(model, folder: Path) -> None:
    model.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    model.to(torch.float32)


def write_hashes(out_dir: Path) -> dict:
    """sha256 of every shipped file under ``out_dir`` (not the hash and build logs)."""
    hashes = {}
    for path in sorted(out_dir.rglob("*")):
        if path.is_file() and path.name not in ("hashes.json", "build.json"):
            hashes[path.relative_to(out_dir).as_posix()] = hashlib.sha256(
                path.read_bytes()).hexdigest()
    (out_dir / "hashes.json").write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    return hashes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=EMBEDDED_DIR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every step count (e.g. 0.1 for a smoke run)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder keeping the pre-trained base and small model, so a "
                             "rerun with the same settings only redoes the fine-tuning")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.use_deterministic_algorithms(True)
    started = time.time()
    timings = {}

    seed = EMBEDDED_WORLD["seed"]
    world = generate_world(**EMBEDDED_WORLD)
    documents = world.pretraining_documents()
    small_people = world.small_model_people(SMALL_HELDOUT_SHARE)
    small_documents = world.pretraining_documents(people=small_people)
    chat = {d: world.chat_examples(d, "finetune") for d in DOMAINS}
    all_chat = [format_chat(e.prompt, e.answer) for d in DOMAINS for e in chat[d]]
    heldout_chat = [format_chat(e.prompt, e.answer)
                    for d in DOMAINS for e in world.chat_examples(d, "heldout")]
    tokenizer = train_tokenizer(documents + all_chat + heldout_chat)
    print(f"world: {len(world.people)} people, {len(documents)} documents, "
          f"vocabulary {len(tokenizer)}", flush=True)

    scale = lambda settings: {**settings, "steps": max(1, int(settings["steps"] * args.scale))}
    models = {}
    t0 = time.time()
    models["base"], base_cached = pretrained_once(
        tokenizer, BASE_SHAPE, documents, scale(PRETRAIN), seed + 1, "base", args.cache)
    timings["pretrain_base_s"] = round(time.time() - t0, 1)

    t0 = time.time()
    models["anti"], small_cached = pretrained_once(
        tokenizer, SMALL_SHAPE, small_documents, scale(SMALL_PRETRAIN), seed + 2, "small",
        args.cache)
    timings["pretrain_small_s"] = round(time.time() - t0, 1)

    epochs = max(1, round(FINETUNE["epochs"] * min(1.0, args.scale * 4)))
    for index, domain in enumerate(DOMAINS):
        t0 = time.time()
        expert = new_model(tokenizer, SMALL_SHAPE, seed=0)
        expert.load_state_dict(models["anti"].state_dict())
        finetune(expert, tokenizer, chat[domain], epochs, FINETUNE["batch_size"],
                 FINETUNE["lr"], seed=seed + 10 + index, name=f"{domain} expert")
        models[f"expert_{domain}"] = expert

        direct = new_model(tokenizer, BASE_SHAPE, seed=0)
        direct.load_state_dict(models["base"].state_dict())
        finetune(direct, tokenizer, chat[domain], epochs, FINETUNE["batch_size"],
                 FINETUNE["lr"], seed=seed + 20 + index, name=f"{domain} direct")
        models[f"direct_{domain}"] = direct
        timings[f"finetune_{domain}_s"] = round(time.time() - t0, 1)

    scores = {name: quick_scores(model, tokenizer, world) for name, model in models.items()}
    for name, row in scores.items():
        print(f"  {name:16s} {row}")

    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in [*models, "tokenizer", "router", "steering.json", "hashes.json", "build.json"]:
        stale = out_dir / name
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    tokenizer.save_pretrained(out_dir / "tokenizer")
    for name, model in models.items():
        save_model(model, out_dir / name)
    t0 = time.time()
    chosen = choose_alphas(load_embedded_family(out_dir), world)
    steering = {"alpha": {d: c["alpha"] for d, c in chosen.items()},
                "validation_exact_match": {d: c["scores"] for d, c in chosen.items()}}
    (out_dir / "steering.json").write_text(json.dumps(steering, indent=1) + "\n")
    print(f"  alpha chosen on validation prompts: {steering['alpha']}", flush=True)
    timings["choose_alpha_s"] = round(time.time() - t0, 1)

    t0 = time.time()
    family = load_embedded_family(out_dir)
    fit_cluster_router(family, world, out_dir / "router", seed=seed)
    timings["router_s"] = round(time.time() - t0, 1)
    timings["total_s"] = round(time.time() - started, 1)
    build = {
        "world": EMBEDDED_WORLD, "small_heldout_share": SMALL_HELDOUT_SHARE,
        "base_shape": BASE_SHAPE, "small_shape": SMALL_SHAPE,
        "pretrain": PRETRAIN, "small_pretrain": SMALL_PRETRAIN, "finetune": FINETUNE,
        "scale": args.scale, "threads": args.threads,
        # Timings of a run that read its pre-trained weights from --cache
        # leave out the pre-training itself.
        "pretrained_from_cache": base_cached or small_cached,
        "parameters": {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()},
        "quick_scores": scores, "timings": timings,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (out_dir / "build.json").write_text(json.dumps(build, indent=1) + "\n")
    hashes = write_hashes(out_dir)
    size = sum((out_dir / p).stat().st_size for p in hashes)
    print(f"saved {len(hashes)} files, {size / 1e6:.1f} MB, in {timings['total_s']} s "
          f"to {out_dir}")


if __name__ == "__main__":
    main()
