"""The one dispatch point for "fuse the logits, apply the settings, pick the next token".

Two backends stand behind :func:`select_next_tokens`:

* ``torch`` (everywhere): fuses the logits in float32, runs Hugging Face's own
  logits processors on them in order, and picks with ``argmax`` or
  ``torch.multinomial`` exactly as ``generate()`` does.  With per-row seeds it
  draws from the counter-based stream of :mod:`proxytune.sampling.reference`
  instead, the same stream the kernels use.
* ``triton`` (CUDA by default, or forced by ``PROXYTUNE_SAMPLER=triton``):
  one fused kernel reads the base and the routed offsets and returns the
  token; the fused logits are only written when scores are asked for.

The kernels understand repetition penalty, temperature, top-k, top-p and
min-p.  A processor list holding anything else (a user's processor, a bad
words list, ...) always runs on the torch backend.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers.generation import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from proxytune.sampling import reference
from proxytune.sampling.params import SamplingParams, SteeringOffset

logger = logging.getLogger(__name__)

__all__ = [
    "SamplingParams",
    "Selection",
    "SteeringOffset",
    "fuse_logits",
    "select_next_tokens",
    "sampling_params_from_processors",
]


@dataclass
class Selection:
    tokens: torch.Tensor  # (B,) int64
    scores: torch.Tensor | None  # (B, V_base) float32 after the processors
    logits: torch.Tensor | None  # (B, V_base) float32 fused, before the processors


def fuse_logits(
    base_logits: torch.Tensor, offsets: list[SteeringOffset], vocab_size: int
) -> torch.Tensor:
    """``base + sum_p alpha_p * (expert_p - anti_p)`` in float32, as a new tensor.

    base_logits: (B, V_base); the result has the same width, with the columns
    at or past ``vocab_size`` (padding of the base's output layer) at -inf.
    Does not modify its inputs.
    """
    fused = reference.fused_logits(base_logits, vocab_size, offsets)
    padding = base_logits.shape[-1] - vocab_size
    return torch.nn.functional.pad(fused, (0, padding), value=float("-inf"))


def sampling_params_from_processors(
    processors: LogitsProcessorList, do_sample: bool
) -> SamplingParams | None:
    """The processor list in kernel form, or ``None`` if it holds anything else.

    Hugging Face builds the list in the order the kernels apply it, so only
    membership is checked here.
    """
    params = SamplingParams(do_sample=do_sample)
    for processor in processors:
        if isinstance(processor, RepetitionPenaltyLogitsProcessor):
            # Hugging Face passes the left-padding lengths here as a tensor;
            # the kernels skip padding through the attention mask instead.
            if isinstance(processor.prompt_ignore_length, int):
                return None
            params.repetition_penalty = float(processor.penalty)
            params.padding_lengths = processor.prompt_ignore_length
        elif isinstance(processor, TemperatureLogitsWarper):
            params.temperature = float(processor.temperature)
        elif isinstance(processor, TopKLogitsWarper):
            params.top_k = int(processor.top_k)
        elif isinstance(processor, TopPLogitsWarper):
            params.top_p = float(processor.top_p)
        elif isinstance(processor, MinPLogitsWarper):
            params.min_p = float(processor.min_p)
        else:
            return None
    return params


def select_next_tokens(
    base_logits: torch.Tensor,
    offsets: list[SteeringOffset],
    vocab_size: int,
    input_ids: torch.Tensor,
    processors: LogitsProcessorList,
    do_sample: bool,
    positions: torch.Tensor,
    seeds: torch.Tensor | None = None,
    backend: str = "torch",
    return_scores: bool = False,
    return_logits: bool = False,
) -> Selection:
    """Fuse the steering offsets into the base logits and pick one token per row.

    Args:
        base_logits: (B, V_base) float32 / bfloat16 / float16, the base's last
            position.  Not modified.
        offsets: one :class:`SteeringOffset` per pair that runs on some row;
            their logits may sit on another device and are moved here.
        vocab_size: the real vocabulary, at most ``V_base``; ids at or past it
            are never picked and score -inf.
        input_ids: (B, T) int64, the base's tokens so far (processors read it).
        processors: Hugging Face's logits processors, applied in order.
        do_sample: draw from the processed distribution, else take its argmax.
        positions: (B,) int64, each row's count of real tokens so far; with
            ``seeds`` it keys the row's random stream.
        seeds: (B,) int64 per-row seeds, or ``None`` to use torch's global
            generator as ``generate()`` does (torch backend only).
        backend: ``"torch"`` or ``"triton"`` (see the module docstring).
        return_scores / return_logits: also return the processed scores / the
            fused logits, each (B, V_base) float32.

    Returns:
        A :class:`Selection`; ``tokens`` is (B,) int64 on the base's device.
    """
    params = sampling_params_from_processors(processors, do_sample)
    if backend == "triton" and params is not None:
        return _select_with_kernels(
            base_logits, offsets, vocab_size, input_ids, params, positions,
            seeds, return_scores, return_logits,
        )

    fused = fuse_logits(base_logits, offsets, vocab_size)
    scores = processors(input_ids, fused.clone() if return_logits else fused)

    if not do_sample:
        tokens = torch.argmax(scores, dim=-1)
    elif seeds is None:
        probs = torch.softmax(scores, dim=-1)
        tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
    else:
        tokens = _draw_with_seeds(scores, positions, seeds)

    return Selection(tokens, scores if return_scores else None,
                     fused if return_logits else None)


def _tokens_seen_by_penalty(input_ids, params: SamplingParams) -> torch.Tensor | None:
    """The tokens the repetition penalty counts: left padding becomes -1 (ignored)."""
    if isinstance(params.repetition_penalty, float) and params.repetition_penalty == 1.0:
        return None
    padding = params.padding_lengths
    if padding is None:
        return input_ids
    columns = torch.arange(input_ids.shape[1], device=input_ids.device)
    return input_ids.masked_fill(columns[None, :] < padding.to(input_ids.device)[:, None], -1)


def _draw_with_seeds(
    scores: torch.Tensor, positions: torch.Tensor, seeds: torch.Tensor
) -> torch.Tensor:
    """Draw from softmax(scores) with the counter-based stream the kernels use."""
    noise = reference.gumbel_noise(seeds, positions, scores.shape[-1])
    return torch.argmax(scores + noise.to(scores.device), dim=-1)


def _select_with_kernels(
    base_logits, offsets, vocab_size, input_ids, params, positions,
    seeds, return_scores, return_logits,
) -> Selection:
    from proxytune.sampling import triton_backend

    if seeds is not None:
        params.seed = seeds
    prev_tokens = _tokens_seen_by_penalty(input_ids, params)
    tokens, _, scores = triton_backend.steer_and_select(
        base_logits, vocab_size, offsets, params, positions, prev_tokens,
        return_logprobs=False, return_scores=return_scores,
    )
    width = base_logits.shape[-1]
    if scores is not None and scores.shape[-1] < width:
        scores = torch.nn.functional.pad(scores, (0, width - scores.shape[-1]),
                                         value=float("-inf"))
    logits = fuse_logits(base_logits, offsets, vocab_size) if return_logits else None
    return Selection(tokens, scores, logits)
