"""Expert pairs, prompt templates, vocabulary alignment and the per-row plan.

Proxy-tuning steers a frozen base with the logit difference of a tuned expert
and its untuned anti-expert.  With several pairs and a batch whose rows are
routed differently, row ``b`` is decoded from

    z[b] = base[b] + sum_p alpha[b, p] * (expert_p[b] - anti_expert_p[b])

where ``alpha[b, p] == 0`` means pair ``p`` does not run on row ``b`` at all.
A :class:`SteeringPlan` holds that ``(batch, pairs)`` matrix.  Hard routing
has at most one non-zero per row; soft routing mixes several.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

logger = logging.getLogger(__name__)


@dataclass
class PromptTemplate:
    """Token ids wrapped around a prompt before one model reads it.

    An expert tuned on chat data may expect its chat template while the base
    reads the raw prompt.  The wrap happens on token ids, so the generated
    tokens can be appended to every model's stream unchanged.
    """

    prefix_ids: list[int] = field(default_factory=list)
    suffix_ids: list[int] = field(default_factory=list)

    PLACEHOLDER = "{prompt}"

    @classmethod
    def from_string(cls, tokenizer, template: str) -> "PromptTemplate":
        """Split ``template`` at ``{prompt}``, e.g. ``"Q: {prompt}\\nA:"``."""
        if template.count(cls.PLACEHOLDER) != 1:
            raise ValueError(
                f"A prompt template needs exactly one '{cls.PLACEHOLDER}', "
                f"got {template!r}."
            )
        prefix, suffix = template.split(cls.PLACEHOLDER)
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
        return cls(encode(prefix) if prefix else [], encode(suffix) if suffix else [])

    @classmethod
    def from_chat_template(cls, tokenizer, system: str | None = None) -> "PromptTemplate":
        """The tokenizer's chat template around one user turn, ready to answer."""
        marker = "\uE000PROMPT\uE000"
        messages = [{"role": "user", "content": marker}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        if marker not in text:
            raise ValueError("The tokenizer's chat template dropped the user message.")
        return cls.from_string(tokenizer, text.replace(marker, cls.PLACEHOLDER))

    def wrap(self, prompt_ids: list[int]) -> list[int]:
        return self.prefix_ids + list(prompt_ids) + self.suffix_ids


@dataclass
class ExpertPair:
    """A tuned expert and its untuned anti-expert, steering with ``alpha``.

    ``anti_expert`` may be ``None``: the expert's logits are then the offset
    itself (useful for a plain logit-mixing baseline).
    """

    name: str
    expert: torch.nn.Module
    anti_expert: torch.nn.Module | None
    alpha: float = 1.0
    expert_template: PromptTemplate | None = None
    anti_template: PromptTemplate | None = None

    def models(self):
        """(role, model, template) for each model the pair runs."""
        yield "expert", self.expert, self.expert_template
        if self.anti_expert is not None:
            yield "anti_expert", self.anti_expert, self.anti_template


@dataclass
class SteeringPlan:
    """Per-row steering strengths: ``alpha[b, p]`` for pair ``pair_names[p]``.

    A zero means pair ``p`` is not run on row ``b``.
    """

    pair_names: list[str]
    alpha: torch.Tensor  # (B, P) float32

    def __post_init__(self):
        if self.alpha.dim() != 2 or self.alpha.shape[1] != len(self.pair_names):
            raise ValueError(
                f"SteeringPlan.alpha must have shape (batch, {len(self.pair_names)}), "
                f"got {tuple(self.alpha.shape)}."
            )
        # Checked on the CPU only: on an accelerator it would cost a host sync.
        if self.alpha.device.type == "cpu" and not torch.isfinite(self.alpha).all():
            raise ValueError("SteeringPlan.alpha holds NaN or infinite values.")

    @property
    def batch_size(self) -> int:
        return self.alpha.shape[0]

    @classmethod
    def none(cls, batch_size: int, pair_names: Sequence[str] = ()) -> "SteeringPlan":
        return cls(list(pair_names), torch.zeros(batch_size, len(pair_names)))

    @classmethod
    def from_choices(
        cls,
        pair_names: Sequence[str],
        choices: Sequence[str | None],
        alphas: float | Sequence[float] | torch.Tensor,
    ) -> "SteeringPlan":
        """One pair (or ``None``) per row, each with its own alpha."""
        pair_names = list(pair_names)
        batch_size = len(choices)
        alphas = torch.as_tensor(alphas, dtype=torch.float32).flatten()
        if alphas.numel() == 1:
            alphas = alphas.expand(batch_size)
        if alphas.numel() != batch_size:
            raise ValueError(
                f"Got {alphas.numel()} alphas for {batch_size} rows: give one per row "
                "or a single float."
            )
        matrix = torch.zeros(batch_size, len(pair_names))
        for row, choice in enumerate(choices):
            if choice is None:
                continue
            if choice not in pair_names:
                raise KeyError(
                    f"Row {row} asks for expert {choice!r}, but the model only has "
                    f"{pair_names or 'no experts'}. Register it with an ExpertPair first."
                )
            matrix[row, pair_names.index(choice)] = alphas[row]
        return cls(pair_names, matrix)

    def repeat_rows(self, times: int) -> "SteeringPlan":
        """Each row repeated ``times`` times, as ``num_return_sequences`` does."""
        return SteeringPlan(self.pair_names, self.alpha.repeat_interleave(times, dim=0))

    def rows_of(self, pair_index: int) -> torch.Tensor:
        """Batch rows that pair ``pair_index`` runs on, ascending."""
        return torch.nonzero(self.alpha[:, pair_index] != 0).flatten()


def check_same_vocabulary(reference_tokenizer, other_tokenizer, other_name: str) -> int:
    """Refuse tokenizers that map any id to a different token.

    Returns the shared vocabulary size.  Models whose logit widths only differ
    by padding are aligned to this size by the engine.
    """
    reference_vocab = {i: t for t, i in reference_tokenizer.get_vocab().items()}
    other_vocab = {i: t for t, i in other_tokenizer.get_vocab().items()}
    for token_id in range(max(len(reference_vocab), len(other_vocab))):
        ours = reference_vocab.get(token_id)
        theirs = other_vocab.get(token_id)
        if ours != theirs:
            raise ValueError(
                f"The tokenizer of {other_name} differs from the base's at token id "
                f"{token_id}: base has {ours!r}, {other_name} has {theirs!r}. "
                "Proxy-tuning adds logits id by id, so every model must share the "
                "base's tokenizer."
            )
    return len(reference_vocab)
