"""Fitting a router from a calibration JSONL file.

Each line of the file is one prompt with what was measured on it, either

    {"prompt": "...", "expert": "math"}        # the best pair; null = no steering
    {"prompt": "...", "scores": {"math": 0.8, "code": 0.3, "none": 0.5}}

All lines use the same form.  With scores, "none" is the unsteered score and
a missing name means "not measured".  Signals are computed in batches with a
progress bar, then the router is fit and saved.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from proxytune.routing import persistence
from proxytune.routing.routers import (
    NO_STEERING,
    ClusterRouter,
    DifficultyRouter,
    Router,
    labels_to_quality,
    option_names,
)

logger = logging.getLogger(__name__)

ROUTER_KINDS = ("cluster", "difficulty")


@dataclass
class CalibrationSet:
    """Prompts and an ``(N, P + 1)`` quality array (column 0 = no steering)."""

    prompts: list[str]
    pair_names: list[str]
    quality: np.ndarray
    from_labels: bool


def read_calibration_jsonl(path: str | Path, pair_names: Sequence[str] | None = None):
    """Read a calibration file into a :class:`CalibrationSet`.

    ``pair_names`` fixes the pairs (and their order); by default they are the
    names found in the file, sorted.  Errors name the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Calibration file {path} does not exist.")
    prompts, labels, score_rows = [], [], []
    with open(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not valid JSON: {error}.")
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{where} needs a string field 'prompt'.")
            has_expert, has_scores = "expert" in record, "scores" in record
            if has_expert == has_scores:
                raise ValueError(
                    f"{where} needs exactly one of 'expert' (a pair name or null) or "
                    "'scores' ({name: score, 'none': score})."
                )
            if (has_scores and labels) or (has_expert and score_rows):
                raise ValueError(f"{where} mixes 'expert' and 'scores' lines; use one form.")
            prompts.append(record["prompt"])
            if has_expert:
                expert = record["expert"]
                if expert is not None and not isinstance(expert, str):
                    raise ValueError(f"{where}: 'expert' must be a pair name or null.")
                labels.append(None if expert in (None, NO_STEERING) else expert)
            else:
                scores = record["scores"]
                if not isinstance(scores, dict) or not all(
                    isinstance(value, (int, float)) for value in scores.values()
                ):
                    raise ValueError(f"{where}: 'scores' must map names to numbers.")
                score_rows.append(scores)
    if not prompts:
        raise ValueError(f"Calibration file {path} holds no prompts.")

    if pair_names is None:
        found = {name for name in labels if name is not None}
        for scores in score_rows:
            found.update(name for name in scores if name != NO_STEERING)
        pair_names = sorted(found)
    pair_names = list(pair_names)

    if labels:
        try:
            quality = labels_to_quality(labels, pair_names)
        except ValueError as error:
            raise ValueError(f"{path}: {error}")
        return CalibrationSet(prompts, pair_names, quality, from_labels=True)

    options = option_names(pair_names)
    quality = np.full((len(prompts), len(options)), np.nan)
    for row, scores in enumerate(score_rows):
        unknown = set(scores) - set(options)
        if unknown:
            raise ValueError(f"{path}: row {row} scores unknown pairs {sorted(unknown)}.")
        for name, score in scores.items():
            quality[row, options.index(name)] = float(score)
    return CalibrationSet(prompts, pair_names, quality, from_labels=False)


@torch.inference_mode()
def compute_signals(
    signal,
    prompts: Sequence[str],
    base_model=None,
    tokenizer=None,
    batch_size: int = 16,
    show_progress: bool = True,
) -> torch.Tensor:
    """``(N, D)`` float32 signal values of ``prompts``, on the CPU.

    A base-hidden-state signal needs the base model and its tokenizer; prompts
    are tokenized as ``tokenizer(prompts)`` does by default (special tokens
    included) with left padding, which is what the engine's prefill must
    match for routes to agree with fitting.
    """
    if signal.needs_base_hidden_states and (base_model is None or tokenizer is None):
        raise ValueError(
            f"Signal {signal.describe()} reads the base's hidden states: pass base_model "
            "and tokenizer."
        )
    batches = range(0, len(prompts), batch_size)
    chunks = []
    for start in tqdm(batches, desc="routing signals", unit="batch", disable=not show_progress):
        batch_prompts = list(prompts[start : start + batch_size])
        if not signal.needs_base_hidden_states:
            chunks.append(signal.embed(batch_prompts).float().cpu())
            continue
        chunks.append(_base_signal(signal, batch_prompts, base_model, tokenizer).cpu())
    return torch.cat(chunks)


def _base_signal(signal, prompts: list[str], base_model, tokenizer) -> torch.Tensor:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        encoded = tokenizer(prompts, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = padding_side
    device = next(base_model.parameters()).device
    encoded = encoded.to(device)
    attention_mask = encoded["attention_mask"]

    # Position ids as generate() builds them for a left-padded batch, so that
    # each row's hidden states match its unpadded prefill in the engine.
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    output = base_model(
        input_ids=encoded["input_ids"],
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_hidden_states=True,
        use_cache=False,
    )
    return signal.pool(output.hidden_states[signal.layer], attention_mask)


def fit_router(
    kind: str,
    signal,
    pair_names: Sequence[str],
    signal_values,
    quality: np.ndarray,
    **options,
) -> Router:
    """Fit a ``"cluster"`` or ``"difficulty"`` router; ``options`` go to its ``fit``."""
    if kind == "cluster":
        return ClusterRouter.fit(signal, pair_names, signal_values, quality, **options)
    if kind == "difficulty":
        return DifficultyRouter.fit(signal, pair_names, signal_values, quality, **options)
    raise ValueError(f"Unknown router kind {kind!r}; choose one of {ROUTER_KINDS}.")


def fit_router_from_jsonl(
    data_path: str | Path,
    signal,
    out_dir: str | Path | None,
    kind: str = "cluster",
    *,
    pair_names: Sequence[str] | None = None,
    base_model=None,
    tokenizer=None,
    batch_size: int = 16,
    show_progress: bool = True,
    n_clusters: int | None = None,
    cost_weight: float = 0.0,
    costs: Sequence[float] | None = None,
    soft_top_k: int = 1,
    temperature: float = 1.0,
    target_share: float = 0.5,
    expert: str | None = None,
    alpha: float | dict = 1.0,
    seed: int = 0,
) -> Router:
    """Read ``data_path``, compute signals, fit a router and save it to ``out_dir``.

    ``kind``: ``"cluster"`` (uses n_clusters, cost_weight, costs, soft_top_k,
    temperature) or ``"difficulty"`` (uses target_share, expert).  When
    ``n_clusters`` is None it is ``max(2, 2 * options)`` capped by the rows.
    ``pair_names`` should be the engine's pairs; by default the file's names.
    ``out_dir=None`` skips saving.  Returns the fitted router.
    """
    calibration = read_calibration_jsonl(data_path, pair_names)
    logger.info(
        "Fitting a %s router on %d prompts over pairs %s",
        kind, len(calibration.prompts), calibration.pair_names,
    )
    signal_values = compute_signals(
        signal, calibration.prompts, base_model, tokenizer, batch_size, show_progress
    )

    if kind == "cluster":
        if n_clusters is None:
            n_clusters = max(2, 2 * (len(calibration.pair_names) + 1))
        n_clusters = min(n_clusters, len(calibration.prompts))
        options = dict(
            n_clusters=n_clusters, cost_weight=cost_weight, costs=costs,
            soft_top_k=min(soft_top_k, n_clusters), temperature=temperature,
        )
    elif kind == "difficulty":
        options = dict(target_share=target_share, expert=expert)
    else:
        raise ValueError(f"Unknown router kind {kind!r}; choose one of {ROUTER_KINDS}.")
    router = fit_router(
        kind, signal, calibration.pair_names, signal_values, calibration.quality,
        alpha=alpha, seed=seed, **options,
    )

    if out_dir is not None:
        persistence.save(router, out_dir)
    return router


def share_steered(plan) -> float:
    """Fraction of rows with any non-zero alpha (reads the plan to the host)."""
    if plan.batch_size == 0:
        return math.nan
    return float((plan.alpha != 0).any(dim=1).float().mean())
