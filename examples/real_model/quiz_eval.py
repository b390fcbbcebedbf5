"""Exact-match evaluation of the base, the expert, proxy-tuning and direct tuning.

Every condition decodes greedily, ``max_new_tokens`` at most, and is scored
by the first line of its answer against the quiz's accepted spellings (see
:meth:`quiz.QuizItem.is_correct`).  The base is tried with two prompts, its
chat template and a few-shot prompt, and is credited with the better one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from proxytune import ExpertPair, ProxyTunedModel
from proxytune.engine import left_pad

logger = logging.getLogger(__name__)

FEW_SHOT_HEADER = "Answer each question with the name of the city only.\n\n"
PROMPT_KINDS = ("chat", "few_shot")


def few_shot_text(shots, question: str) -> str:
    """``Q: ... / A: ...`` pairs from ``shots`` (training items), then ``question``."""
    lines = [FEW_SHOT_HEADER]
    for shot in shots:
        lines.append(f"Q: {shot.question}\nA: {shot.answer}\n\n")
    lines.append(f"Q: {question}\nA:")
    return "".join(lines)


def chat_prompt_ids(tokenizer, template, question: str) -> list[int]:
    return template.wrap(tokenizer.encode(question, add_special_tokens=False))


@torch.no_grad()
def generate_texts(generate, tokenizer, prompts: list[list[int]], *, batch_size: int,
                   max_new_tokens: int, **steering) -> list[str]:
    """Greedy continuations of token-id ``prompts`` through ``generate``, decoded.

    ``generate`` is a Hugging Face ``generate`` or :meth:`ProxyTunedModel.generate`;
    ``steering`` goes to it unchanged (for instance ``expert="capitals"``).
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        input_ids, attention_mask = left_pad(chunk, pad_id)
        output = generate(input_ids, attention_mask=attention_mask, do_sample=False,
                          max_new_tokens=max_new_tokens, pad_token_id=pad_id, **steering)
        new_tokens = output[:, input_ids.shape[1]:]
        texts += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return texts


@dataclass
class ConditionResult:
    name: str
    description: str
    correct: list[bool]
    answers: list[str]
    seconds: float
    mentioned: list[bool] = field(default_factory=list)

    @property
    def exact_match(self) -> float:
        return sum(self.correct) / max(1, len(self.correct))


def share_of_gap_closed(base_em: float, proxy_em: float, direct_em: float) -> float | None:
    """``(proxy - base) / (direct - base)``; None when direct tuning did not beat the base."""
    if direct_em <= base_em:
        return None
    return (proxy_em - base_em) / (direct_em - base_em)


def build_prompts(kind: str, tokenizer, template, items, shots) -> list[list[int]]:
    """Token ids of each question in the chat template or in the few-shot prompt."""
    if kind == "chat":
        return [chat_prompt_ids(tokenizer, template, item.question) for item in items]
    if kind == "few_shot":
        return [tokenizer.encode(few_shot_text(shots, item.question), add_special_tokens=False)
                for item in items]
    raise ValueError(f"Unknown prompt kind {kind!r}; use one of {PROMPT_KINDS}.")


def exact_match(items, answers) -> float:
    return sum(item.is_correct(answer) for item, answer in zip(items, answers)) / len(items)


def select_proxy_setting(proxy, tokenizer, template, validation_items, shots, alphas, *,
                         batch_size: int, max_new_tokens: int) -> tuple[dict, list[dict]]:
    """The base prompt and alpha with the best exact match on ``validation_items``.

    Every model of the pair reads the same tokens as the base.  Ties go to the
    earlier entry of the grid (chat before few-shot, smaller alpha first).
    Returns the chosen ``{"prompt": ..., "alpha": ...}`` and the whole grid.
    """
    grid = []
    for kind in PROMPT_KINDS:
        prompts = build_prompts(kind, tokenizer, template, validation_items, shots)
        for alpha in alphas:
            answers = generate_texts(proxy.generate, tokenizer, prompts, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens, expert="capitals",
                                     alpha=alpha)
            grid.append({"prompt": kind, "alpha": alpha,
                         "validation_exact_match": exact_match(validation_items, answers)})
            logger.info("validation: %s", grid[-1])
    best = max(grid, key=lambda row: row["validation_exact_match"])  # first of the best
    return {"prompt": best["prompt"], "alpha": best["alpha"]}, grid


def base_on_validation(base, tokenizer, template, validation_items, shots, *,
                       batch_size: int, max_new_tokens: int) -> dict[str, float]:
    """The base alone's exact match on ``validation_items`` per prompt kind (for reading)."""
    scores = {}
    for kind in PROMPT_KINDS:
        answers = generate_texts(base.generate, tokenizer,
                                 build_prompts(kind, tokenizer, template, validation_items, shots),
                                 batch_size=batch_size, max_new_tokens=max_new_tokens)
        scores[kind] = exact_match(validation_items, answers)
    return scores


def validate_only(base, expert, anti_expert, tokenizer, template, shots, validation_items,
                  alphas, *, batch_size: int = 16, max_new_tokens: int = 12) -> dict:
    """The proxy grid and the base alone on ``validation_items``; no test question is read."""
    proxy = ProxyTunedModel(base, [ExpertPair("capitals", expert, anti_expert)],
                            tokenizer=tokenizer)
    started = time.perf_counter()
    chosen, grid = select_proxy_setting(proxy, tokenizer, template, validation_items, shots,
                                        alphas, batch_size=batch_size,
                                        max_new_tokens=max_new_tokens)
    base_scores = base_on_validation(base, tokenizer, template, validation_items, shots,
                                     batch_size=batch_size, max_new_tokens=max_new_tokens)
    return {"chosen": chosen, "grid": grid, "base_alone_validation_exact_match": base_scores,
            "seconds": round(time.perf_counter() - started, 1)}


def evaluate_all(base, expert, anti_expert, direct, tokenizer, template, test_items, shots,
                 validation_items, alphas, *, batch_size: int = 16,
                 max_new_tokens: int = 12) -> tuple[dict[str, ConditionResult], dict]:
    """Run every condition on ``test_items``; returns results by name and the selection.

    The proxy-tuned base's prompt and alpha are chosen on ``validation_items``
    (training-half questions that no model was trained on) before the test.
    """
    proxy = ProxyTunedModel(base, [ExpertPair("capitals", expert, anti_expert)],
                            tokenizer=tokenizer)
    # The base's validation scores in the selection are for reading only.
    selection = validate_only(base, expert, anti_expert, tokenizer, template, shots,
                              validation_items, alphas, batch_size=batch_size,
                              max_new_tokens=max_new_tokens)
    chosen = selection["chosen"]
    prompt_names = {"chat": "chat template", "few_shot": f"{len(shots)}-shot prompt"}

    def prompts(kind):
        return build_prompts(kind, tokenizer, template, test_items, shots)

    conditions = [
        ("base_chat", "base alone, chat template", base.generate, prompts("chat"), {}),
        ("base_few_shot", f"base alone, {prompt_names['few_shot']}", base.generate,
         prompts("few_shot"), {}),
        ("expert", "expert alone, chat template", expert.generate, prompts("chat"), {}),
        ("proxy_tuned", f"proxy-tuned base, {prompt_names[chosen['prompt']]}, "
                        f"alpha={chosen['alpha']:g}", proxy.generate, prompts(chosen["prompt"]),
         {"expert": "capitals", "alpha": chosen["alpha"]}),
        ("direct_tuned", "directly tuned base, chat template", direct.generate,
         prompts("chat"), {}),
    ]
    results = {}
    for name, description, generate, condition_prompts, steering in conditions:
        started = time.perf_counter()
        answers = generate_texts(generate, tokenizer, condition_prompts, batch_size=batch_size,
                                 max_new_tokens=max_new_tokens, **steering)
        seconds = time.perf_counter() - started
        correct = [item.is_correct(answer) for item, answer in zip(test_items, answers)]
        mentioned = [item.is_mentioned(answer) for item, answer in zip(test_items, answers)]
        results[name] = ConditionResult(name, description, correct, answers, seconds, mentioned)
        logger.info("%s: exact match %.3f in %.1f s", name, results[name].exact_match, seconds)
    return results, selection


def summary(results: dict[str, ConditionResult]) -> dict:
    """The headline numbers: best base prompt, proxy gain, share of the gap closed."""
    em = {name: result.exact_match for name, result in results.items()}
    best_base = max(("base_chat", "base_few_shot"), key=lambda name: em[name])
    gap = share_of_gap_closed(em[best_base], em["proxy_tuned"], em["direct_tuned"])
    return {"exact_match": em, "best_base_prompt": best_base, "best_base": em[best_base],
            "proxy_gain_over_best_base": em["proxy_tuned"] - em[best_base],
            "share_of_gap_closed": gap, "questions": len(next(iter(results.values())).correct)}


def markdown_table(results: dict[str, ConditionResult], numbers: dict) -> str:
    """The results table, one row per condition, then the headline lines."""
    total = numbers["questions"]
    rows = ["| condition | exact match | correct | answer mentioned anywhere | eval time (s) |",
            "|---|---:|---:|---:|---:|"]
    for result in results.values():
        rows.append(f"| {result.description} | {result.exact_match:.1%} | "
                    f"{sum(result.correct)}/{total} | {sum(result.mentioned)}/{total} | "
                    f"{result.seconds:.0f} |")
    gap = numbers["share_of_gap_closed"]
    gap_text = f"{gap:.0%}" if gap is not None else "n/a (direct tuning did not beat the base)"
    rows += [
        "",
        f"- Best base prompt: {results[numbers['best_base_prompt']].description} "
        f"({numbers['best_base']:.1%}).",
        f"- Proxy-tuning over the best base prompt: "
        f"{numbers['proxy_gain_over_best_base'] * 100:+.1f} points.",
        f"- Share of the base-to-direct-tuning gap closed by proxy-tuning: {gap_text}.",
        "- Exact match reads the first line of the answer; \"mentioned anywhere\" only asks",
        "  whether an accepted spelling appears anywhere in the generated tokens.",
    ]
    return "\n".join(rows) + "\n"


def plot_results(results: dict[str, ConditionResult], path: Path, title: str) -> None:
    """A bar chart of exact match per condition, written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [result.description.replace(", ", "\n", 1) for result in results.values()]
    values = [100 * result.exact_match for result in results.values()]
    colours = ["#9e9e9e", "#bdbdbd", "#64b5f6", "#e65100", "#2e7d32"][: len(values)]
    figure, axis = plt.subplots(figsize=(9, 4.2))
    bars = axis.bar(range(len(values)), values, color=colours)
    axis.bar_label(bars, labels=[f"{v:.1f}%" for v in values], padding=2)
    axis.set_xticks(range(len(values)), names, fontsize=8)
    axis.set_ylabel("exact match on held-out questions (%)")
    axis.set_ylim(0, max(values + [1.0]) * 1.2)
    axis.set_title(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
