"""The proxy-tuning paper's main table in miniature, on the embedded family.

For each instruction domain of the synthetic world (:mod:`proxytune.experiments.world`),
on the test prompts (held-out prompts about people that no fine-tuning data
mentions, less the validation people on which the build chose each pair's
alpha, see :func:`choose_alphas`):

1. **task score** (exact match of the reply) of the base alone, the small
   expert alone, the proxy-tuned base (base + expert - anti-expert) and the
   directly tuned base, and the share of the gap closed,
   ``(proxy - base) / (direct - base)``;
2. **knowledge check** of the same held-out facts, which no fine-tuning
   data states, for the base, the directly tuned base and the proxy-tuned
   base, every model asked the same prompts: plain-text completions
   ("kelvor lives in" -> the town) scored greedily (the headline column) and
   by whether the true value ranks first among the attribute's values; and
   the ``qa`` question in chat form, ranked the same way at the first reply
   token (knowledge reachable after a chat question, format aside);
3. **routing ablation** on a shuffled mix of every domain's held-out
   prompts: no steering, one expert for every row, the shipped cluster
   router, a difficulty router fitted here, and the oracle (each row's true
   domain).

Results go to ``results.md``, ``results.json`` and three PNG plots.
Decoding is greedy, prompt subsets are drawn with ``seed``, so a rerun
gives the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from proxytune.engine import ProxyTunedModel
from proxytune.loading.embedded import EmbeddedFamily, load_embedded_family
from proxytune.experiments.world import DOMAINS, EMBEDDED_WORLD, World, generate_world

logger = logging.getLogger(__name__)

TASK_TOKENS = 4  # the answer word and <|end|>, with room for a rambling reply

# generate(input_ids (B, T), attention_mask (B, T), rows, max_new_tokens) -> (B, T + new)
Generate = Callable[[torch.Tensor, torch.Tensor, Sequence[int], int], torch.Tensor]


def chat_texts(tokenizer, prompts: Sequence[str]) -> list[str]:
    """Each prompt as one user turn of the tokenizer's chat template, ready to answer."""
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                      add_generation_prompt=True)
        for prompt in prompts
    ]


def generate_replies(
    generate: Generate,
    tokenizer,
    texts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 32,
    desc: str = "generating",
    show_progress: bool = True,
) -> list[str]:
    """Greedy replies to ``texts``, cut at the end-of-turn token and decoded."""
    replies = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=not show_progress):
        rows = list(range(start, min(start + batch_size, len(texts))))
        batch = tokenizer([texts[r] for r in rows], add_special_tokens=False, padding=True,
                          return_tensors="pt")
        prompt_width = batch["input_ids"].shape[1]
        output = generate(batch["input_ids"], batch["attention_mask"], rows, max_new_tokens)
        for new_tokens in output[:, prompt_width:].tolist():
            if tokenizer.eos_token_id in new_tokens:
                new_tokens = new_tokens[:new_tokens.index(tokenizer.eos_token_id)]
            replies.append(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
    return replies


def plain_generate(model, tokenizer) -> Generate:
    """Greedy Hugging Face generation of one unsteered model."""
    def generate(input_ids, attention_mask, rows, max_new_tokens):
        return model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return generate


def steered_generate(proxy: ProxyTunedModel, steering_for_rows) -> Generate:
    """Greedy proxy-tuned generation; ``steering_for_rows(rows)`` gives the
    steering keywords of ``ProxyTunedModel.generate`` for those rows."""
    def generate(input_ids, attention_mask, rows, max_new_tokens):
        return proxy.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=proxy.tokenizer.pad_token_id,
            eos_token_id=proxy.tokenizer.eos_token_id, **steering_for_rows(rows),
        )
    return generate


def exact_match(replies: Sequence[str], answers: Sequence[str]) -> list[float]:
    return [float(reply == answer) for reply, answer in zip(replies, answers)]


def calibration_prompts(world: World, per_domain: int, seed: int) -> tuple[list[str], list[str]]:
    """Prompts of the fine-tuning splits (never held out) and their domains."""
    rng = random.Random(f"calibration-{seed}")
    prompts, domains = [], []
    for domain in DOMAINS:
        examples = world.chat_examples(domain, "finetune")
        for example in rng.sample(examples, min(per_domain, len(examples))):
            prompts.append(example.prompt)
            domains.append(domain)
    return prompts, domains


def base_signal(family: EmbeddedFamily):
    """The routers' signal: the base's last hidden layer, mean-pooled."""
    from proxytune.routing import BaseHiddenStateSignal

    return BaseHiddenStateSignal.for_model(family.base, layer=-1, pooling="mean",
                                           model_name="base")


def fit_cluster_router(family: EmbeddedFamily, world: World, out_dir: str | Path | None,
                       per_domain: int = 64, n_clusters: int = 6, seed: int = 0):
    """Fit the k-means router on labelled calibration prompts; save it when asked."""
    from proxytune.routing import ClusterRouter, compute_signals, save

    prompts, domains = calibration_prompts(world, per_domain, seed)
    signal = base_signal(family)
    values = compute_signals(signal, chat_texts(family.tokenizer, prompts), family.base,
                             family.tokenizer, show_progress=False)
    router = ClusterRouter.fit(signal, list(family.pairs), values, domains,
                               n_clusters=n_clusters, seed=seed)
    if out_dir is not None:
        save(router, out_dir)
    return router


def fit_difficulty_router(family: EmbeddedFamily, proxy: ProxyTunedModel, world: World,
                          per_domain: int, seed: int, batch_size: int, show_progress: bool):
    """Fit a difficulty router on calibration prompts scored under every option.

    Each prompt is answered with no steering and with each pair; its quality
    row is the exact match of each, so the router learns when steering helps
    and which pair to use.
    """
    from proxytune.routing import DifficultyRouter, compute_signals

    prompts, domains = calibration_prompts(world, per_domain, seed + 1)
    answers = {}
    for domain in DOMAINS:
        answers.update({e.prompt: e.answer for e in world.chat_examples(domain, "finetune")})
    texts = chat_texts(family.tokenizer, prompts)
    gold = [answers[p] for p in prompts]

    options = [None, *proxy.pair_names]
    quality = np.zeros((len(prompts), len(options)))
    for column, option in enumerate(options):
        generate = steered_generate(proxy, lambda rows, option=option: {"expert": option})
        replies = generate_replies(generate, family.tokenizer, texts, TASK_TOKENS, batch_size,
                                   f"difficulty calibration ({option or 'none'})",
                                   show_progress)
        quality[:, column] = exact_match(replies, gold)

    signal = base_signal(family)
    values = compute_signals(signal, texts, family.base, family.tokenizer,
                             show_progress=False)
    helped = float(((quality[:, 1:].max(axis=1) - quality[:, 0]) > 0).mean())
    alphas = {name: float(family.pairs[name].alpha) for name in proxy.pair_names}
    return DifficultyRouter.fit(signal, proxy.pair_names, values, quality,
                                target_share=max(helped, 0.05), alpha=alphas, seed=seed)


def load_cluster_router(family: EmbeddedFamily, world: World, seed: int):
    """The shipped cluster router, or one fitted now when the build has none.

    The router steers each pair with that pair's alpha in ``family`` (the
    run's steering strength), not the alpha it was fitted and saved with.
    """
    from proxytune.routing import load

    if family.router_dir is None:
        logger.warning("The embedded family ships no router; fitting one for this run.")
        router = fit_cluster_router(family, world, None, seed=seed)
    else:
        router = load(family.router_dir, expected_signal=base_signal(family))
    router.pair_alpha = pair_alphas(family, router.pair_names).to(router.pair_alpha)
    return router


def pair_alphas(family: EmbeddedFamily, pair_names: Sequence[str]) -> torch.Tensor:
    """``(P,)`` the alpha of each named pair of ``family``, in that order."""
    return torch.tensor([float(family.pairs[name].alpha) for name in pair_names])


def choose_alphas(family: EmbeddedFamily, world: World,
                  candidates: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
                  batch_size: int = 32) -> dict[str, dict]:
    """Each domain's steering strength: the candidate alpha whose proxy-tuned
    base scores best on the validation prompts (the smallest on a tie).

    Returns ``{domain: {"alpha": best, "scores": {alpha: exact match}}}``;
    the test prompts are never decoded here.
    """
    proxy = ProxyTunedModel(family.base, list(family.pairs.values()),
                            tokenizer=family.tokenizer)
    chosen = {}
    for domain in DOMAINS:
        examples = world.chat_examples(domain, "validation")
        if not examples:
            raise ValueError("The world has no validation people; generate it with "
                             "validation_share > 0 to choose alpha.")
        texts = chat_texts(family.tokenizer, [e.prompt for e in examples])
        answers = [e.answer for e in examples]
        scores = {}
        for alpha in sorted(candidates):
            steering = lambda rows, d=domain, a=alpha: {"expert": d, "alpha": a}
            replies = generate_replies(steered_generate(proxy, steering), family.tokenizer,
                                       texts, TASK_TOKENS, batch_size, show_progress=False)
            scores[alpha] = float(np.mean(exact_match(replies, answers)))
        best = max(scores, key=lambda a: (scores[a], -a))
        logger.info("%s: alpha %.2f (validation exact match %s)", domain, best, scores)
        chosen[domain] = {"alpha": best, "scores": scores}
    return chosen


def run_alignment(
    out_dir: str | Path = "results/alignment",
    n_prompts: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    alpha: float | None = None,
    family: EmbeddedFamily | None = None,
    show_progress: bool = True,
) -> str:
    """Run the whole experiment, write its files to ``out_dir``, return the Markdown.

    ``n_prompts`` test prompts per domain (default: all of them) are drawn
    with ``seed``; the knowledge check asks about the same people.  Each
    pair steers with the family's alpha (chosen on validation prompts by the
    build), or with ``alpha`` for every pair when given.
    """
    if n_prompts is not None and n_prompts < 1:
        raise ValueError(f"n_prompts must be at least 1 (or None for all), got {n_prompts}.")
    started = time.time()
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if family is None:
        family = load_embedded_family(alpha=alpha)
    elif alpha is not None:
        # Every setting, routers included, steers with this run's alpha.
        pairs = {name: dataclasses.replace(pair, alpha=alpha)
                 for name, pair in family.pairs.items()}
        family = dataclasses.replace(family, pairs=pairs)
    tokenizer = family.tokenizer
    world = generate_world(**EMBEDDED_WORLD)
    proxy = ProxyTunedModel(family.base, list(family.pairs.values()), tokenizer=tokenizer)
    rng = random.Random(seed)

    heldout = {}
    for domain in DOMAINS:
        examples = world.chat_examples(domain, "test")
        if n_prompts is not None and n_prompts < len(examples):
            examples = rng.sample(examples, n_prompts)
        heldout[domain] = examples
    probes = {}
    for domain in DOMAINS:
        asked = {(e.person, e.attribute) for e in heldout[domain]}
        probes[domain] = [p for p in world.knowledge_probes() if (p.person, p.attribute) in asked]

    def run(generate, texts, answers, max_new_tokens, desc):
        replies = generate_replies(generate, tokenizer, texts, max_new_tokens, batch_size,
                                   desc, show_progress)
        return float(np.mean(exact_match(replies, answers))), replies

    results = {"domains": {}, "knowledge": {}, "routing": {}}
    steps = [(d, part) for d in DOMAINS for part in ("task", "knowledge")] + [("mixed", "routing")]
    progress = tqdm(steps, desc="alignment", unit="step", disable=not show_progress)
    for domain, part in progress:
        progress.set_postfix_str(f"{domain} {part}")
        if part == "task":
            examples = heldout[domain]
            texts = chat_texts(tokenizer, [e.prompt for e in examples])
            answers = [e.answer for e in examples]
            direct = family.load_direct(domain)
            generators = {
                "base": plain_generate(family.base, tokenizer),
                "expert": plain_generate(family.pairs[domain].expert, tokenizer),
                "proxy": steered_generate(proxy, lambda rows, d=domain: {"expert": d}),
                "direct": plain_generate(direct, tokenizer),
            }
            scores, examples_out = {}, {}
            for name, generate in generators.items():
                scores[name], replies = run(generate, texts, answers, TASK_TOKENS,
                                            f"{domain} {name}")
                examples_out[name] = replies[:3]
            gap = scores["direct"] - scores["base"]
            scores["gap_closed"] = (scores["proxy"] - scores["base"]) / gap if gap else None
            scores["n_prompts"] = len(examples)
            scores["examples"] = {"prompts": [e.prompt for e in examples[:3]],
                                  "answers": answers[:3], **examples_out}
            results["domains"][domain] = scores
        elif part == "knowledge":
            texts = [p.prompt for p in probes[domain]]
            answers = [p.answer for p in probes[domain]]
            direct = family.load_direct(domain)
            generators = {
                "base": plain_generate(family.base, tokenizer),
                "direct": plain_generate(direct, tokenizer),
                "proxy": steered_generate(proxy, lambda rows, d=domain: {"expert": d}),
            }
            knowledge = {name: run(g, texts, answers, 1, f"{domain} knowledge {name}")[0]
                         for name, g in generators.items()}
            knowledge["n_probes"] = len(texts)
            knowledge["ranked"] = ranked_knowledge(family, direct, domain, world,
                                                   probes[domain], batch_size)
            results["knowledge"][domain] = knowledge
        else:
            results["routing"] = routing_ablation(family, proxy, world, heldout, seed,
                                                  batch_size, show_progress, run)

    results["summary"] = summarize(results)
    alphas = {name: float(pair.alpha) for name, pair in family.pairs.items()}
    results["settings"] = {"n_prompts": n_prompts, "seed": seed, "alpha": alphas,
                           "batch_size": batch_size, "world": EMBEDDED_WORLD,
                           "seconds": round(time.time() - started, 1)}
    markdown = results_markdown(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "results.md").write_text(markdown)
    write_plots(results, out_dir)
    logger.info("Alignment experiment written to %s in %.0f s.", out_dir, time.time() - started)
    return markdown


@torch.no_grad()
def next_token_logits(model, tokenizer, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    """``(N, V)`` float32 logits of the token after each text (left-padded batches)."""
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start:start + batch_size]), add_special_tokens=False,
                          padding=True, return_tensors="pt")
        mask = batch["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=batch["input_ids"], attention_mask=mask,
                       position_ids=positions).logits
        rows.append(logits[:, -1, :len(tokenizer)].float())
    return torch.cat(rows)


def ranked_knowledge(family: EmbeddedFamily, direct, domain: str, world: World,
                     probes, batch_size: int) -> dict:
    """Share of probes whose true value ranks first among the attribute's values.

    Two prompt forms, the same for every model: the plain-text probe and the
    ``qa`` question in chat form (scored at the first reply token).  The
    proxy's logits are ``base + alpha * (expert - anti_expert)``, the steering
    rule of the engine, for this one next token.
    """
    from proxytune.experiments.world import QUESTIONS

    tokenizer = family.tokenizer
    pair = family.pairs[domain]
    forms = {
        "text": [p.prompt for p in probes],
        "chat": chat_texts(tokenizer, [QUESTIONS[p.attribute].format(p=p.person)
                                       for p in probes]),
    }
    answer_ids = [tokenizer.convert_tokens_to_ids(p.answer) for p in probes]
    candidate_ids = [tokenizer.convert_tokens_to_ids(world.values(p.attribute))
                     for p in probes]

    scores = {}
    for form, texts in forms.items():
        logits = {name: next_token_logits(model, tokenizer, texts, batch_size)
                  for name, model in [("base", family.base), ("direct", direct),
                                      ("expert", pair.expert), ("anti", pair.anti_expert)]}
        logits["proxy"] = logits["base"] + pair.alpha * (logits["expert"] - logits["anti"])
        for name in ("base", "direct", "proxy"):
            hits = [
                float(candidates[int(logits[name][row, candidates].argmax())] == answer)
                for row, (candidates, answer) in enumerate(zip(candidate_ids, answer_ids))
            ]
            scores[f"{form} {name}"] = float(np.mean(hits))
    return scores


def routing_ablation(family, proxy, world, heldout, seed, batch_size, show_progress, run):
    """Mixed-domain scores of each routing setting, and each one's share of the oracle."""
    mixed = [e for domain in DOMAINS for e in heldout[domain]]
    random.Random(f"mixed-{seed}").shuffle(mixed)
    texts = chat_texts(family.tokenizer, [e.prompt for e in mixed])
    answers = [e.answer for e in mixed]
    domains = [e.domain for e in mixed]
    cluster = load_cluster_router(family, world, seed)
    difficulty = fit_difficulty_router(family, proxy, world, 48, seed, batch_size,
                                       show_progress)

    settings = {"no steering": lambda rows: {"expert": None}}
    for domain in DOMAINS:
        settings[f"{domain} expert for all"] = lambda rows, d=domain: {"expert": d}
    settings["cluster router"] = lambda rows: {"router": cluster}
    settings["difficulty router"] = lambda rows: {"router": difficulty}
    # The oracle steers each row with its true domain's pair.
    settings["oracle"] = lambda rows: {"expert": [domains[r] for r in rows]}

    scores = {}
    for name, steering_for_rows in settings.items():
        scores[name] = run(steered_generate(proxy, steering_for_rows), texts, answers,
                           TASK_TOKENS, f"mixed {name}")[0]
    oracle = scores["oracle"]
    return {
        "n_prompts": len(mixed),
        "scores": scores,
        "share_of_oracle": {name: (s / oracle if oracle else None) for name, s in scores.items()},
    }


def summarize(results: dict) -> dict:
    """The issue's targets, each with its measured value and whether it holds."""
    domains = results["domains"]
    gaps = [s["gap_closed"] for s in domains.values() if s["gap_closed"] is not None]
    mean_gap = float(np.mean(gaps)) if gaps else None
    routing = results["routing"]["scores"]
    singles = [routing[f"{d} expert for all"] for d in DOMAINS]
    best_router = max(routing["cluster router"], routing["difficulty router"])
    return {
        "mean_gap_closed": mean_gap,
        "targets": {
            "mean gap closed >= 0.85": mean_gap is not None and mean_gap >= 0.85,
            "proxy > expert in every domain": all(
                s["proxy"] > s["expert"] for s in domains.values()),
            "knowledge: proxy >= direct in every domain": all(
                k["proxy"] >= k["direct"] for k in results["knowledge"].values()),
            "cluster router > every single expert": routing["cluster router"] > max(singles),
            "cluster router >= 95% of oracle": (
                routing["cluster router"] >= 0.95 * routing["oracle"]),
            "best router": best_router,
        },
    }


def results_markdown(results: dict) -> str:
    """The tables of ``results.md``."""
    lines = [
        "## Proxy-tuning the embedded family",
        "",
        "Task score = exact match on test prompts about people no fine-tuning data "
        "mentions. Knowledge = plain-text completion of those people's facts.",
        "",
        "Steering strength per pair (chosen on validation people by the build, or set "
        "for the run): " + ", ".join(
            f"{name} alpha {value:g}" for name, value in results["settings"]["alpha"].items()
        ) + ".",
        "",
        "| domain | base | expert | proxy-tuned base | directly tuned base | gap closed "
        "| knowledge: base | knowledge: direct | knowledge: proxy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for domain, s in results["domains"].items():
        k = results["knowledge"][domain]
        gap = "n/a" if s["gap_closed"] is None else f"{s['gap_closed']:.2f}"
        lines.append(
            f"| {domain} | {s['base']:.3f} | {s['expert']:.3f} | {s['proxy']:.3f} | "
            f"{s['direct']:.3f} | {gap} | {k['base']:.3f} | {k['direct']:.3f} | "
            f"{k['proxy']:.3f} |"
        )
    mean_gap = results["summary"]["mean_gap_closed"]
    lines += ["", f"Mean share of the gap closed: "
              f"{'n/a' if mean_gap is None else f'{mean_gap:.2f}'}", ""]

    lines += [
        "### Knowledge check in detail",
        "",
        "Same prompts for every model. Greedy: the next token is the true value. Ranked: "
        "the true value scores highest among the attribute's possible values. The chat "
        "form asks the `qa` question in the chat markers (first reply token).",
        "",
        "| domain | probe | base | directly tuned base | proxy-tuned base |",
        "|---|---|---|---|---|",
    ]
    for domain, k in results["knowledge"].items():
        ranked = k["ranked"]
        lines.append(f"| {domain} | plain text, greedy | {k['base']:.3f} | "
                     f"{k['direct']:.3f} | {k['proxy']:.3f} |")
        for form, label in (("text", "plain text, ranked"), ("chat", "chat question, ranked")):
            lines.append(f"| {domain} | {label} | {ranked[f'{form} base']:.3f} | "
                         f"{ranked[f'{form} direct']:.3f} | {ranked[f'{form} proxy']:.3f} |")
    lines.append("")

    routing = results["routing"]
    lines += [
        f"### Routing on a mixed set ({routing['n_prompts']} prompts)",
        "",
        "| steering | score | share of oracle |",
        "|---|---|---|",
    ]
    for name, score in routing["scores"].items():
        share = routing["share_of_oracle"][name]
        lines.append(f"| {name} | {score:.3f} | {'n/a' if share is None else f'{share:.2f}'} |")
    lines += ["", "### Targets", ""]
    for target, holds in results["summary"]["targets"].items():
        if isinstance(holds, bool):
            lines.append(f"- {target}: {'yes' if holds else 'NO'}")
    return "\n".join(lines) + "\n"


def write_plots(results: dict, out_dir: Path) -> None:
    """``task_scores.png``, ``knowledge.png`` and ``routing.png`` in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(results["domains"])
    positions = np.arange(len(domains))

    def grouped_bars(filename, title, series, table):
        figure, axes = plt.subplots(figsize=(6, 3.6))
        width = 0.8 / len(series)
        for index, (label, key) in enumerate(series):
            values = [table[d][key] for d in domains]
            axes.bar(positions + (index - (len(series) - 1) / 2) * width, values, width,
                     label=label)
        axes.set_xticks(positions, domains)
        axes.set_ylim(0, 1.05)
        axes.set_ylabel("exact match")
        axes.set_title(title)
        axes.legend(fontsize=8, loc="lower right")
        figure.tight_layout()
        figure.savefig(out_dir / filename, dpi=120)
        plt.close(figure)

    grouped_bars(
        "task_scores.png", "Held-out task score",
        [("base", "base"), ("small expert", "expert"), ("proxy-tuned base", "proxy"),
         ("directly tuned base", "direct")],
        results["domains"],
    )
    grouped_bars(
        "knowledge.png", "Knowledge check (facts never in fine-tuning data)",
        [("base", "base"), ("directly tuned base", "direct"), ("proxy-tuned base", "proxy")],
        results["knowledge"],
    )

    scores = results["routing"]["scores"]
    figure, axes = plt.subplots(figsize=(6, 3.6))
    names = list(scores)
    axes.barh(names[::-1], [scores[n] for n in names[::-1]], color="tab:blue")
    axes.set_xlim(0, 1.05)
    axes.set_xlabel("exact match on the mixed set")
    axes.set_title("Routing ablation")
    figure.tight_layout()
    figure.savefig(out_dir / "routing.png", dpi=120)
    plt.close(figure)
