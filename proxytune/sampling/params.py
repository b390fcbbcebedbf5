"""The inputs of the fused "steer, filter, pick" step, shared by every backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A per-row knob is either one Python number for the whole batch or a (B,) tensor.
RowKnob = float | int | torch.Tensor


@dataclass
class SteeringOffset:
    """One expert pair's logits on the rows routed to it.

    ``expert_logits`` and ``anti_logits`` hold only the R routed rows, packed
    in ascending batch order.  ``row_map[b]`` is the packed row of batch row
    ``b``, or -1 where the pair does not steer row ``b``.  Their width may
    exceed the fused vocabulary (padding); columns past it are never read.
    ``anti_logits`` may be ``None``: the offset is then ``alpha * expert``.
    """

    expert_logits: torch.Tensor  # (R, V_e), float32 / bfloat16 / float16
    anti_logits: torch.Tensor | None  # (R, V_a) or None
    row_map: torch.Tensor  # (B,) int32, -1 for rows without this pair
    alpha: torch.Tensor  # (B,) float32, ignored where row_map == -1


@dataclass
class SamplingParams:
    """Hugging Face's sampling settings in per-row form.

    Applied in Hugging Face's order: repetition penalty, temperature, top-k,
    top-p, min-p.  The neutral values switch a filter off: penalty 1.0,
    temperature 1.0, top_k 0, top_p 1.0, min_p 0.0.  ``do_sample=False``
    takes the argmax (lowest id among ties) and ignores the warpers.
    ``seed`` and the row's ``position`` (its count of tokens so far) key a
    counter-based random stream, so a row's draw is the same whatever else
    shares the batch.
    """

    do_sample: bool = False
    temperature: RowKnob = 1.0
    top_k: RowKnob = 0
    top_p: RowKnob = 1.0
    min_p: RowKnob = 0.0
    repetition_penalty: RowKnob = 1.0
    seed: RowKnob = 0
    # (B,) count of left-padding tokens, which the repetition penalty skips.
    padding_lengths: torch.Tensor | None = None
