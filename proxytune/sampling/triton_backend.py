"""Adapter from proxytune's sampling contract to the Triton kernels, and the
choice between them and the PyTorch path.

``choose_backend`` reads ``PROXYTUNE_SAMPLER`` (``auto`` | ``triton`` |
``torch``): ``auto`` takes the kernels on CUDA when triton imports and the
PyTorch path elsewhere; ``triton`` also runs on the CPU when
``TRITON_INTERPRET=1`` is set before the kernels are first imported (slow:
for tests).  Triton is optional: nothing here imports it until a kernel runs.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from proxytune.sampling.params import SamplingParams, SteeringOffset
from proxytune.sampling.reference import check_inputs, row_knob

logger = logging.getLogger(__name__)

ENV_VAR = "PROXYTUNE_SAMPLER"
_CHOICES = ("auto", "triton", "torch")
_logged_choices: set[tuple[str, str]] = set()


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose_backend(device: torch.device | str) -> str:
    """``"triton"`` or ``"torch"`` for logits on ``device``; logs the choice once."""
    device = torch.device(device)
    wanted = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if wanted not in _CHOICES:
        raise ValueError(f"{ENV_VAR}={wanted!r} is not one of {', '.join(_CHOICES)}.")

    if wanted == "torch":
        choice, reason = "torch", f"{ENV_VAR}=torch"
    elif wanted == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but triton does not import; install it "
                               f"or set {ENV_VAR}=torch.")
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(f"{ENV_VAR}=triton on a {device.type} device needs "
                               f"TRITON_INTERPRET=1 (the Triton interpreter), set before "
                               f"the kernels are imported.")
        choice, reason = "triton", f"{ENV_VAR}=triton"
    elif device.type == "cuda" and triton_available():
        choice, reason = "triton", "auto: CUDA device and triton imports"
    else:
        choice = "torch"
        reason = ("auto: triton does not import" if device.type == "cuda"
                  else f"auto: {device.type} device")

    if (choice, reason) not in _logged_choices:
        _logged_choices.add((choice, reason))
        logger.info("sampling backend: %s (%s)", choice, reason)
    return choice


def _fold_extra_offsets(base_logits, vocab_size, offsets):
    """Pairs past the second, added into a float32 copy of the base.

    The kernels fuse two pairs; soft routing over more pairs pays one extra
    (B, V) float32 write and read here.
    """
    from proxytune.sampling.reference import fused_logits

    if len(offsets) <= 2:
        return base_logits, offsets
    logger.debug("folding %d steering pairs into the base logits", len(offsets) - 2)
    return fused_logits(base_logits, vocab_size, offsets[2:]), offsets[:2]


def _unit_stride(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


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
    """Same contract as :func:`proxytune.sampling.reference.steer_and_select`,
    computed by the fused kernels; the steered logits are materialised only
    when ``return_scores`` asks for them (or with more than two pairs).

    NOTE: knob values given as tensors are not range-checked here (that would
    cost a host synchronisation per token); the PyTorch path checks them.
    """
    from proxytune_kernels.steer_sample import SteerPair, default_block, sample_next_tokens

    check_inputs(base_logits, vocab_size, offsets, positions, prev_tokens)
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        value = getattr(params, name)
        bad = not isinstance(value, torch.Tensor) and (
            (name == "temperature" and params.do_sample and value <= 0)
            or (name in ("top_p", "min_p") and not 0 <= value <= 1)
            or (name == "repetition_penalty" and value <= 0))
        if bad:
            raise ValueError(f"SamplingParams.{name}={value!r} is out of range "
                             f"(temperature > 0, top_p and min_p in [0, 1], penalty > 0).")

    batch, device = base_logits.shape[0], base_logits.device
    base, offsets = _fold_extra_offsets(base_logits, vocab_size, offsets)
    pairs = [
        SteerPair(
            expert=_unit_stride(offset.expert_logits),
            anti=None if offset.anti_logits is None else _unit_stride(offset.anti_logits),
            row_map=row_knob(offset.row_map, batch, torch.int32, device, "row_map"),
            alpha=row_knob(offset.alpha, batch, torch.float32, device, "alpha"),
        )
        for offset in offsets
    ]
    return sample_next_tokens(
        _unit_stride(base), vocab_size, pairs,
        do_sample=params.do_sample, temperature=params.temperature, top_k=params.top_k,
        top_p=params.top_p, min_p=params.min_p,
        repetition_penalty=params.repetition_penalty, seeds=params.seed,
        positions=positions.to(device), prev_tokens=prev_tokens,
        return_logprobs=return_logprobs, return_scores=return_scores,
        block=default_block(device),
    )
