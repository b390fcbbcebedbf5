"""Building and training the small expert pair and the directly tuned base.

* anti-expert: some of the base's decoder layers (its first and last ones),
  kept with its final norm and (tied) output layer, then distilled from the
  base (or trained on prose) so that it is a working small LM sharing the
  base's tokenizer;
* expert: that anti-expert fine-tuned on the training examples (by itself,
  or through the frozen base: see :func:`through_base_loss`);
* directly tuned base: a copy of the base fine-tuned on the same examples.

Every model keeps its token embedding (which is also its output layer)
frozen, so the three recipes differ only in the decoder layers they train.
Losses are computed on answer tokens only, and the output layer runs on
those positions only: on a CPU it is the most expensive part of a small model.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

logger = logging.getLogger(__name__)

IGNORE = -100


def truncated_copy(base, num_layers: int, last_layers: int = 0):
    """A new model made of ``num_layers`` of the base's decoder layers, its norm and output layer.

    The kept layers are the base's first ``num_layers - last_layers`` and its
    last ``last_layers``, in order: the last layers map the residual stream to
    the output layer's space, so such a model starts much closer to the base
    than its first layers alone.  The base is not modified; the copy shares no
    tensors with it.
    """
    total = base.config.num_hidden_layers
    if not 0 < num_layers <= total:
        raise ValueError(f"num_layers must be in 1..{total}, got {num_layers}.")
    if not 0 <= last_layers <= num_layers:
        raise ValueError(f"last_layers must be in 0..{num_layers}, got {last_layers}.")
    kept_layers = list(range(num_layers - last_layers)) + list(range(total - last_layers, total))
    new_index = {old: new for new, old in enumerate(kept_layers)}
    config = copy.deepcopy(base.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[old] for old in kept_layers]
    small = type(base)(config)
    kept = {}
    for name, tensor in base.state_dict().items():
        if name.startswith("model.layers."):
            parts = name.split(".")
            if int(parts[2]) not in new_index:
                continue
            parts[2] = str(new_index[int(parts[2])])
            name = ".".join(parts)
        kept[name] = tensor
    missing, unexpected = small.load_state_dict(kept, strict=False)
    missing = [name for name in missing if name != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"Truncation mismatch: missing {missing}, unexpected {unexpected}.")
    small.tie_weights()
    return small.eval()


def freeze_embeddings(model) -> list[torch.nn.Parameter]:
    """Unfreeze everything but the input embedding and output layer; return what trains."""
    model.requires_grad_(True)
    model.get_input_embeddings().weight.requires_grad_(False)
    model.get_output_embeddings().weight.requires_grad_(False)
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def answer_only_loss(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not ignored.

    ``input_ids``, ``attention_mask`` and ``labels`` are ``(B, T)``; ``labels``
    holds the token at each position or ``IGNORE``.  The output layer only
    runs on the ``(N, H)`` hidden states that predict a kept label.
    """
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)
    hidden = hidden.last_hidden_state[:, :-1]  # (B, T-1, H): position t predicts t+1
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE
    logits = model.get_output_embeddings()(hidden[keep])  # (N, V)
    return F.cross_entropy(logits.float(), targets[keep])


def _kept_logits(model, input_ids, attention_mask, keep) -> torch.Tensor:
    """``(N, V)`` float logits at the ``(B, T-1)`` positions ``keep`` (position t predicts t+1)."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)
    return model.get_output_embeddings()(hidden.last_hidden_state[:, :-1][keep]).float()


def _kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(reference || model) over the rows of two ``(N, V)`` logit tensors."""
    return F.kl_div(logits.log_softmax(-1), reference_logits.log_softmax(-1), log_target=True,
                    reduction="batchmean")


def distillation_loss(model, teacher, input_ids, attention_mask, labels) -> torch.Tensor:
    """Mean KL(teacher || model) of the next-token distributions at the kept positions.

    ``teacher`` (the frozen base) runs without gradients on the same tokens; the
    full vocabulary is matched, not only the token that follows.
    """
    keep = labels[:, 1:] != IGNORE
    logits = _kept_logits(model, input_ids, attention_mask, keep)
    with torch.no_grad():
        teacher_logits = _kept_logits(teacher, input_ids, attention_mask, keep)
    return _kl(teacher_logits, logits)


def anchored_answer_loss(model, reference, weight, input_ids, attention_mask, labels):
    """Answer-token cross-entropy plus ``weight`` times KL(reference || model) there.

    The KL keeps the tuned model's distribution at each answer position close to
    the untuned ``reference``'s (the anti-expert), so tuning moves probability
    towards the target without collapsing onto one confident guess.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = _kept_logits(model, input_ids, attention_mask, keep)
    loss = F.cross_entropy(logits, targets[keep])
    if weight:
        with torch.no_grad():
            reference_logits = _kept_logits(reference, input_ids, attention_mask, keep)
        loss = loss + weight * _kl(reference_logits, logits)
    return loss


def through_base_loss(model, anti_expert, base, alpha, input_ids, attention_mask, labels,
                      anchor: float = 0.0):
    """Answer-token cross-entropy of the proxy-tuned base, trained through the expert only.

    The logits scored are ``base + alpha * (model - anti_expert)``, the very
    combination that decoding uses, with the base and the anti-expert frozen.
    At the start the expert equals the anti-expert, so the loss is the base's
    own; its gradient is then large only where the steered base answers
    wrongly, so the expert learns corrections to the base instead of what a
    small model would guess alone.  A positive
    ``anchor`` adds that times KL(anti-expert || expert) at the same positions,
    which keeps the offset near zero where the base needs no correction.
    """
    keep = labels[:, 1:] != IGNORE
    expert_logits = _kept_logits(model, input_ids, attention_mask, keep)
    with torch.no_grad():
        anti_logits = _kept_logits(anti_expert, input_ids, attention_mask, keep)
        base_logits = _kept_logits(base, input_ids, attention_mask, keep)
    steered = base_logits.log_softmax(-1) + alpha * (expert_logits.log_softmax(-1)
                                                     - anti_logits.log_softmax(-1))
    loss = F.cross_entropy(steered, labels[:, 1:][keep])
    if anchor:
        loss = loss + anchor * _kl(anti_logits, expert_logits)
    return loss


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-pad ``(ids, labels)`` pairs into ``(B, T)`` tensors with a mask."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask, labels


def prose_examples(tokenizer, documents: list[str], max_tokens: int,
                   token_budget: int) -> list[tuple[list[int], list[int]]]:
    """Each document as one example (cut at ``max_tokens``), until ``token_budget`` tokens."""
    examples, used = [], 0
    eos = tokenizer.eos_token_id
    for text in documents:
        ids = tokenizer.encode(text, add_special_tokens=False)[: max_tokens - 1] + [eos]
        if len(ids) < 4:
            continue
        examples.append((ids, ids))
        used += len(ids)
        if used >= token_budget:
            break
    return examples


def distillation_examples(tokenizer, template, items, shots) -> list[tuple[list[int], list[int]]]:
    """Each item as a chat exchange and as a few-shot ``Q: ... A: ...`` text, fully labelled.

    The anti-expert learns the base's next-token distributions on the two
    prompt forms it will read at evaluation, at every position.
    """
    from quiz_eval import few_shot_text  # here, so that training needs no evaluation module

    examples = []
    eos = tokenizer.eos_token_id
    for item in items:
        prompt = template.wrap(tokenizer.encode(item.question, add_special_tokens=False))
        chat = prompt + tokenizer.encode(item.answer, add_special_tokens=False) + [eos]
        few_shot = tokenizer.encode(few_shot_text(shots, item.question) + f" {item.answer}",
                                    add_special_tokens=False)
        examples += [(chat, chat), (few_shot, few_shot)]
    return examples


def few_shot_examples(tokenizer, items, shots) -> list[tuple[list[int], list[int]]]:
    """Each item as the few-shot prompt followed by `` answer`` and a blank line.

    Only the answer and the line break after it are labelled.
    """
    from quiz_eval import few_shot_text

    examples = []
    for item in items:
        prompt = tokenizer.encode(few_shot_text(shots, item.question), add_special_tokens=False)
        answer = tokenizer.encode(f" {item.answer}\n\n", add_special_tokens=False)
        examples.append((prompt + answer, [IGNORE] * len(prompt) + answer))
    return examples


def chat_examples(tokenizer, template, items) -> list[tuple[list[int], list[int]]]:
    """``template``-wrapped question followed by the answer and end-of-turn.

    Only the answer and the end-of-turn token are labelled.
    """
    examples = []
    end_of_turn = tokenizer.eos_token_id
    for item in items:
        prompt = template.wrap(tokenizer.encode(item.question, add_special_tokens=False))
        answer = tokenizer.encode(item.answer, add_special_tokens=False) + [end_of_turn]
        examples.append((prompt + answer, [IGNORE] * len(prompt) + answer))
    return examples


def train(model, examples, *, epochs: float, batch_size: int, lr: float, pad_id: int,
          seed: int = 0, description: str = "train", teacher=None, reference=None,
          reference_weight: float = 0.0, steered_base=None, steer_alpha: float = 1.0) -> dict:
    """AdamW with linear warm-up and cosine decay over ``examples``; returns a log.

    The loss is :func:`answer_only_loss`; with a ``teacher``, it is
    :func:`distillation_loss` instead; with a ``reference`` and a positive
    ``reference_weight``, :func:`anchored_answer_loss`; with a ``reference``
    (the anti-expert) and a ``steered_base``, :func:`through_base_loss`.
    Batches group examples of similar length to waste little on padding.
    Changes ``model`` in place and leaves it in eval mode.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    parameters = freeze_embeddings(model)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    batches_per_epoch = math.ceil(len(examples) / batch_size)
    total_steps = max(1, round(epochs * batches_per_epoch))
    warmup = max(1, total_steps // 10)

    def learning_rate(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate)
    model.train()
    started, losses, tokens_seen, step = time.perf_counter(), [], 0, 0
    progress = tqdm(total=total_steps, desc=description, leave=False)
    while step < total_steps:
        order = list(range(len(examples)))
        rng.shuffle(order)
        chunks = [order[i:i + batch_size * 8] for i in range(0, len(order), batch_size * 8)]
        batches = []
        for chunk in chunks:  # sort within chunks of 8 batches: similar lengths together
            chunk.sort(key=lambda index: len(examples[index][0]))
            batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        for batch in batches:
            if step >= total_steps:
                break
            input_ids, attention_mask, labels = pad_batch([examples[i] for i in batch], pad_id)
            if teacher is not None:
                loss = distillation_loss(model, teacher, input_ids, attention_mask, labels)
            elif steered_base is not None:
                loss = through_base_loss(model, reference, steered_base, steer_alpha,
                                         input_ids, attention_mask, labels,
                                         anchor=reference_weight)
            elif reference is not None and reference_weight > 0:
                loss = anchored_answer_loss(model, reference, reference_weight, input_ids,
                                            attention_mask, labels)
            else:
                loss = answer_only_loss(model, input_ids, attention_mask, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            tokens_seen += int(attention_mask.sum())
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
    progress.close()
    model.eval()
    seconds = time.perf_counter() - started
    window = max(1, len(losses) // 10)
    log = {"steps": total_steps, "examples": len(examples), "tokens": tokens_seen,
           "seconds": round(seconds, 1), "first_loss": round(sum(losses[:window]) / window, 4),
           "last_loss": round(sum(losses[-window:]) / window, 4)}
    logger.info("%s: %s", description, log)
    return log
