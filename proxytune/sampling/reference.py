"""The "steer, filter, pick" step in plain PyTorch: the path that runs everywhere.

It is also the reference the Triton kernels are tested against, so it is
written for clarity: the fused logits are materialised, the filters sort.
Its steps, in order (Hugging Face's warper order):

1. ``z = base + sum_p alpha_p * (expert_p - anti_p)`` on each pair's routed rows,
   in float32, over the first ``vocab_size`` columns (a column where expert and
   anti-expert are both ``-inf`` gives ``-inf``, not nan);
2. repetition penalty on the ids in the row's previous tokens
   (``z < 0 ? z * penalty : z / penalty``);
3. greedy: argmax, lowest id among ties; the warpers are skipped;
4. sampling: temperature, top-k (ties with the k-th value kept), top-p (keep a
   token iff the probability of the strictly more probable tokens is below
   ``top_p``: all tokens tied at the boundary are kept, where Hugging Face keeps
   an arbitrary subset of them), min-p (keep ``p >= min_p * p_max``, tested as
   ``s >= s_max + log(min_p)``), then a Gumbel-max draw from the kept tokens.

The Gumbel noise comes from a counter-based hash of (seed, position, token id)
written in int64 torch ops that emulate uint32 arithmetic, bit for bit the
hash of ``kernels/steer_sample.py``: both paths draw the same token.
"""

from __future__ import annotations

import logging

import torch

from proxytune.sampling.params import RowKnob, SamplingParams, SteeringOffset

logger = logging.getLogger(__name__)

_UINT32 = 0xFFFFFFFF


# ---------------------------------------------------------------- input checks


def row_knob(value: RowKnob, batch: int, dtype: torch.dtype, device, name: str) -> torch.Tensor:
    """A per-row knob (number or (B,) tensor) as a (B,) tensor of ``dtype``."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(batch)
        if value.shape != (batch,):
            raise ValueError(
                f"SamplingParams.{name} must be a number or a ({batch},) tensor, "
                f"got a tensor of shape {tuple(value.shape)}.")
        return value.to(device=device, dtype=dtype)
    return torch.full((batch,), value, dtype=dtype, device=device)


def check_inputs(base_logits, vocab_size, offsets, positions, prev_tokens) -> None:
    """Raise ValueError naming the first malformed input and how to fix it."""
    if base_logits.dim() != 2:
        raise ValueError(f"base_logits must be (B, V), got shape {tuple(base_logits.shape)}.")
    batch, width = base_logits.shape
    if base_logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"base_logits must be float32, bfloat16 or float16, "
                         f"got {base_logits.dtype}.")
    if not 0 < vocab_size <= width:
        raise ValueError(f"vocab_size {vocab_size} must be in [1, {width}] "
                         f"(the base logits' width).")
    if positions.shape != (batch,):
        raise ValueError(f"positions must be ({batch},), got {tuple(positions.shape)}.")
    if prev_tokens is not None and (prev_tokens.dim() != 2 or prev_tokens.shape[0] != batch):
        raise ValueError(f"prev_tokens must be ({batch}, T) or None, "
                         f"got {tuple(prev_tokens.shape)}.")
    for index, offset in enumerate(offsets):
        where = f"offsets[{index}]"
        if offset.row_map.shape != (batch,) or offset.alpha.shape != (batch,):
            raise ValueError(f"{where}.row_map and .alpha must be ({batch},), got "
                             f"{tuple(offset.row_map.shape)} and {tuple(offset.alpha.shape)}.")
        logits = [offset.expert_logits] + (
            [offset.anti_logits] if offset.anti_logits is not None else [])
        for tensor in logits:
            if tensor.dim() != 2 or tensor.shape[1] < vocab_size:
                raise ValueError(f"{where}: expert / anti-expert logits must be (R, V>="
                                 f"{vocab_size}), got {tuple(tensor.shape)}.")
        if len(logits) == 2 and logits[0].shape[0] != logits[1].shape[0]:
            raise ValueError(f"{where}: expert and anti-expert pack different row counts.")
        if offset.row_map.numel() and int(offset.row_map.max()) >= offset.expert_logits.shape[0]:
            raise ValueError(f"{where}.row_map points past the {offset.expert_logits.shape[0]} "
                             f"packed rows; pack one row per routed batch row.")


def check_knob_values(params: SamplingParams, temperature, top_p, min_p, penalty) -> None:
    """Raise ValueError for knob values Hugging Face would refuse too."""
    if params.do_sample and bool((temperature <= 0).any()):
        raise ValueError("temperature must be > 0 when sampling; use do_sample=False "
                         "for greedy decoding.")
    if bool(((top_p < 0) | (top_p > 1)).any()) or bool(((min_p < 0) | (min_p > 1)).any()):
        raise ValueError("top_p and min_p must lie in [0, 1].")
    if bool((penalty <= 0).any()):
        raise ValueError("repetition_penalty must be > 0 (1.0 switches it off).")


# ---------------------------------------------------------------- the steps


def fused_logits(base_logits, vocab_size: int, offsets: list[SteeringOffset]) -> torch.Tensor:
    """Step 1: (B, vocab_size) float32 steered logits; inputs are not modified."""
    fused = base_logits[:, :vocab_size].float().clone()
    for offset in offsets:
        routed = (offset.row_map >= 0).nonzero()[:, 0]
        packed = offset.row_map[routed].long()
        delta = offset.expert_logits[packed, :vocab_size].float()
        if offset.anti_logits is not None:
            delta = delta - offset.anti_logits[packed, :vocab_size].float()
        fused[routed] += offset.alpha[routed].float()[:, None] * delta
    return torch.nan_to_num(fused, nan=float("-inf"), posinf=float("inf"),
                            neginf=float("-inf"))


def seen_mask(prev_tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, T) ids -> (B, V) bool, True where the id occurs; ids outside [0, V) ignored."""
    valid = (prev_tokens >= 0) & (prev_tokens < vocab_size)
    ids = torch.where(valid, prev_tokens, vocab_size)
    mask = torch.zeros(prev_tokens.shape[0], vocab_size + 1, dtype=torch.bool,
                       device=prev_tokens.device)
    mask.scatter_(1, ids, True)
    return mask[:, :vocab_size]


def apply_repetition_penalty(logits, prev_tokens, penalty) -> torch.Tensor:
    """Step 2: Hugging Face's repetition penalty, (B, V) -> new (B, V)."""
    seen = seen_mask(prev_tokens.to(logits.device), logits.shape[1])
    penalty = penalty[:, None]
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def filter_scores(scores, top_k, top_p, min_p) -> torch.Tensor:
    """Step 4's filters on (B, V) tempered scores; filtered entries become -inf.

    ``top_k`` (B,) int64 (0: off), ``top_p`` (B,) (1.0: off), ``min_p`` (B,)
    (0.0: off).  Returns a new tensor.
    """
    vocab_size = scores.shape[1]
    minus_inf = torch.tensor(float("-inf"), device=scores.device)
    ordered = scores.sort(dim=1, descending=True).values

    # top-k: keep scores >= the k-th largest (ties kept)
    use_top_k = (top_k > 0) & (top_k < vocab_size)
    kth = ordered.gather(1, (top_k.clamp(1, vocab_size) - 1)[:, None])
    kth = torch.where(use_top_k[:, None], kth, minus_inf)
    scores = torch.where(scores >= kth, scores, minus_inf)
    ordered = torch.where(ordered >= kth, ordered, minus_inf)

    # top-p: probability of the strictly more probable tokens must be < top_p
    ordered_probs = torch.softmax(ordered, dim=1)
    mass_before = torch.cat([torch.zeros_like(ordered_probs[:, :1]),
                             ordered_probs.cumsum(dim=1)], dim=1)
    num_greater = torch.searchsorted(-ordered, -scores, side="left")
    mass_greater = mass_before.gather(1, num_greater)
    keep = (mass_greater < top_p[:, None]) | (num_greater == 0) | (top_p[:, None] >= 1.0)
    scores = torch.where(keep, scores, minus_inf)

    # min-p: p >= min_p * p_max, that is s >= s_max + log(min_p)
    floor = scores.amax(dim=1, keepdim=True) + torch.log(min_p)[:, None]
    return torch.where(scores >= floor, scores, minus_inf)


# ---------------------------------------------------------------- random numbers


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """The kernels' uint32 avalanche hash, on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _UINT32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _UINT32
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B,) int64 seeds and positions -> (B,) stream keys (uint32 values in int64)."""
    key = _mix32((seeds & _UINT32) ^ 0x9E3779B9)
    key = _mix32(key ^ ((seeds >> 32) & _UINT32))
    return _mix32(key ^ (positions & _UINT32))


def gumbel_noise(seeds, positions, vocab_size: int) -> torch.Tensor:
    """(B, V) float32 Gumbel(0, 1) noise keyed on (seed, position, token id)."""
    keys = row_keys(seeds.long(), positions.long())[:, None]
    token_ids = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)[None, :]
    bits = _mix32(token_ids ^ keys)
    bits = _mix32((bits + keys) & _UINT32)
    uniform = ((bits >> 8).float() + 0.5) * (1.0 / 16777216.0)
    return -torch.log(-torch.log(uniform))


# ---------------------------------------------------------------- entry point


def steer_and_select(
    base_logits: torch.Tensor,
    vocab_size: int,
    offsets: list[SteeringOffset],
    params: SamplingParams,
    positions: torch.Tensor,
    prev_tokens: torch.Tensor | None,
    return_logprobs: bool = False,
    return_scores: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Pick the next token of every row from the steered logits.

    ``base_logits`` (B, V_b) with V_b >= ``vocab_size``; ``positions`` (B,)
    int64; ``prev_tokens`` (B, T) int64 or None.  Returns ``(tokens (B,) int64,
    logprobs (B,) float32 or None, scores (B, vocab_size) float32 or None)``:
    ``scores`` are the processed scores (``-inf`` where filtered), ``logprobs``
    their log-softmax at the chosen token.  Inputs are not modified.
    """
    check_inputs(base_logits, vocab_size, offsets, positions, prev_tokens)
    batch, device = base_logits.shape[0], base_logits.device
    knob = lambda value, dtype, name: row_knob(value, batch, dtype, device, name)
    temperature = knob(params.temperature, torch.float32, "temperature")
    top_k = knob(params.top_k, torch.int64, "top_k")
    top_p = knob(params.top_p, torch.float32, "top_p")
    min_p = knob(params.min_p, torch.float32, "min_p")
    penalty = knob(params.repetition_penalty, torch.float32, "repetition_penalty")
    check_knob_values(params, temperature, top_p, min_p, penalty)

    scores = fused_logits(base_logits, vocab_size, offsets)

    if prev_tokens is not None:
        scores = apply_repetition_penalty(scores, prev_tokens, penalty)

    if params.do_sample:
        scores = filter_scores(scores / temperature[:, None], top_k, top_p, min_p)
        seeds = knob(params.seed, torch.int64, "seed")
        noise = gumbel_noise(seeds, positions.to(device), vocab_size)
        tokens = (scores + noise).argmax(dim=1)
    else:
        tokens = scores.argmax(dim=1)  # the first maximum: lowest id among ties

    logprobs = None
    if return_logprobs:
        logprobs = torch.log_softmax(scores, dim=1).gather(1, tokens[:, None])[:, 0]
    return tokens, logprobs, scores if return_scores else None
