"""The generation loop: a frozen base steered by routed expert pairs.

:class:`ProxyTunedModel.generate` takes the arguments of Hugging Face's
``generate()`` and returns what it returns.  Hugging Face prepares the call
(generation config, logits processors, stopping criteria, left padding,
``num_return_sequences``) and then hands the decoding loop to
:func:`decode`, through its ``custom_generate`` hook.  The loop:

1. runs the base's prefill over the whole left-padded batch, with hidden
   states when a router reads them;
2. builds the per-row steering plan (given by the caller, or routed);
3. opens one stream per model of each pair, over the rows routed to that
   pair only, each with its own prompt template, cache and position ids;
4. per step: checks every model's logits for NaN, fuses the base logits
   with the pairs' offsets and picks the next token at the sampling dispatch
   point (the kernel path flags NaN on the device and reads the flag after
   the kernels are queued, so the host still waits for the device about
   once per step);
5. appends the token to every stream, checks the stopping criteria, streams
   it, and runs each model one step.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers import GenerationConfig
from transformers.generation import (
    GenerateDecoderOnlyOutput,
    StoppingCriteriaList,
    StopStringCriteria,
)

from proxytune.sampling import SteeringOffset, select_next_tokens
from proxytune.steering import ExpertPair, PromptTemplate, SteeringPlan, check_same_vocabulary

logger = logging.getLogger(__name__)


class ProxyTunedModel:
    """A frozen base model with named expert / anti-expert pairs.

    Args:
        base: a Hugging Face causal LM; it is never modified.
        pairs: the expert pairs, each with a unique name.
        tokenizer: the base's tokenizer.  It sets the real vocabulary size
            (extra output columns of any model are masked) and is checked
            against each pair's ``tokenizer`` when one is given.
    """

    def __init__(self, base, pairs: Sequence[ExpertPair] = (), tokenizer=None):
        self.base = base
        self.tokenizer = tokenizer
        self.pairs: dict[str, ExpertPair] = {}
        for pair in pairs:
            self.add_pair(pair)

    def add_pair(self, pair: ExpertPair, tokenizer=None) -> None:
        if pair.name in self.pairs:
            raise ValueError(f"An expert pair named {pair.name!r} is already registered.")
        if tokenizer is not None:
            if self.tokenizer is None:
                raise ValueError("Give the base's tokenizer first, to compare vocabularies.")
            check_same_vocabulary(self.tokenizer, tokenizer, f"expert pair {pair.name!r}")
        self.pairs[pair.name] = pair

    @property
    def pair_names(self) -> list[str]:
        return list(self.pairs)

    def vocab_size(self) -> int:
        """The fused vocabulary: the tokenizer's, else the narrowest model's."""
        widths = {"base": _output_width(self.base)}
        for pair in self.pairs.values():
            for role, model, _ in pair.models():
                widths[f"{pair.name}.{role}"] = _output_width(model)
        if self.tokenizer is not None:
            size = len(self.tokenizer)
            too_narrow = {name: w for name, w in widths.items() if w < size}
            if too_narrow:
                raise ValueError(
                    f"The tokenizer has {size} tokens but these models output fewer "
                    f"logits: {too_narrow}. They cannot share this tokenizer."
                )
            return size
        if len(set(widths.values())) > 1:
            logger.info("Output widths differ %s; using the narrowest.", widths)
        return min(widths.values())

    def plan(
        self,
        batch_size: int,
        expert: str | Sequence[str | None] | None = None,
        alpha: float | Sequence[float] | torch.Tensor | None = None,
    ) -> SteeringPlan:
        """A hard-routing plan: one expert name (or None) per row and its alpha.

        ``alpha`` defaults to each pair's own default alpha.
        """
        if expert is None or isinstance(expert, str):
            expert = [expert] * batch_size
        if len(expert) != batch_size:
            raise ValueError(f"Got {len(expert)} expert choices for a batch of {batch_size}.")
        for row, name in enumerate(expert):
            if name is not None and name not in self.pairs:
                raise ValueError(
                    f"Row {row} asks for expert {name!r}, but this model has "
                    f"{self.pair_names or 'no experts'}. Register it with add_pair()."
                )
        if alpha is None:
            alpha = [self.pairs[name].alpha if name else 0.0 for name in expert]
        return SteeringPlan.from_choices(self.pair_names, expert, alpha)

    def decoding_method(self, **steering):
        """The loop as a ``custom_generate`` callable for ``base.generate()``.

        ``base.generate(ids, custom_generate=model.decoding_method(expert="qa"))``
        runs the same loop as :meth:`generate`; ``steering`` takes the
        keyword arguments ``expert``, ``alpha``, ``steering``, ``router``,
        ``prompts``, ``seed``, ``backend`` and ``streamer``.
        """
        return functools.partial(decode, steerer=self, **steering)

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor=None,
        stopping_criteria=None,
        streamer=None,
        *,
        expert: str | Sequence[str | None] | None = None,
        alpha: float | Sequence[float] | torch.Tensor | None = None,
        steering: SteeringPlan | None = None,
        router=None,
        prompts: Sequence[str] | None = None,
        seed: int | Sequence[int] | torch.Tensor | None = None,
        backend: str | None = None,
        **kwargs,
    ):
        """Hugging Face's ``generate()``, with per-row steering.

        Steering per row is chosen by one of: ``expert`` (a name or one per
        row, None for no steering) with ``alpha`` (a float or one per row);
        ``steering`` (a :class:`SteeringPlan`, soft routing included); or
        ``router`` (a router from :mod:`proxytune.routing`).  ``prompts`` are
        the prompt texts, needed by routers that embed text.  ``seed`` (an
        int or one per row) makes sampling reproducible per row, whatever
        else shares the batch.  ``backend`` forces "torch" or "triton".
        Everything else is passed to Hugging Face's ``generate()``.
        """
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        _validate_request(self.base, input_ids, kwargs.get("attention_mask"),
                          generation_config, kwargs)
        stopping_criteria = _with_stop_strings(stopping_criteria, generation_config, kwargs)
        decode_fn = self.decoding_method(
            expert=expert, alpha=alpha, steering=steering, router=router,
            prompts=prompts, seed=seed, backend=backend, streamer=streamer,
        )
        return self.base.generate(
            input_ids,
            generation_config=generation_config,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            streamer=streamer,
            custom_generate=decode_fn,
            **kwargs,
        )


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int):
    """Token-id lists -> (input_ids, attention_mask), each (B, T), padded on the left."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            input_ids[row, width - len(prompt):] = torch.as_tensor(prompt)
            attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask


def _output_width(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _setting(name: str, generation_config, kwargs, default=None):
    if name in kwargs:
        return kwargs[name]
    if generation_config is not None:
        return getattr(generation_config, name, default)
    return default


def _validate_request(base, input_ids, attention_mask, generation_config, kwargs) -> None:
    """Refuse settings that would fail deep in the loop, saying what to change."""
    if input_ids is None:
        raise ValueError("generate() needs input_ids: tokenize the prompts first.")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be (batch, prompt_length) with at least one token, got "
            f"shape {tuple(input_ids.shape)}. An empty prompt gives the model nothing "
            "to continue: add at least a BOS token."
        )
    if attention_mask is not None:
        empty_rows = torch.nonzero(attention_mask.sum(-1) == 0).flatten().tolist()
        if empty_rows:
            raise ValueError(
                f"Rows {empty_rows} of the batch are empty (attention_mask all zero). "
                "Give every prompt at least one token, e.g. the BOS token."
            )

    config = generation_config or base.generation_config
    temperature = _setting("temperature", config, kwargs)
    if temperature is not None and temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    top_p = _setting("top_p", config, kwargs)
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}.")
    max_new_tokens = _setting("max_new_tokens", config, kwargs)
    if max_new_tokens is not None and max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")


def _with_stop_strings(stopping_criteria, generation_config, kwargs):
    """Build the stop-string criterion here, from the ``tokenizer`` keyword.

    Hugging Face drops the tokenizer on its way to a custom decoding method,
    so the criterion it would build is made before the call instead.
    """
    stop_strings = kwargs.pop("stop_strings", None)
    if stop_strings is None and generation_config is not None:
        stop_strings = generation_config.stop_strings
        if stop_strings is not None:
            generation_config = generation_config.copy()
            generation_config.stop_strings = None
    tokenizer = kwargs.pop("tokenizer", None)
    if stop_strings is None:
        return stopping_criteria
    if tokenizer is None:
        raise ValueError(
            "stop_strings needs the tokenizer: call generate(..., stop_strings=..., "
            "tokenizer=tokenizer)."
        )
    criteria = StoppingCriteriaList(stopping_criteria or [])
    criteria.append(StopStringCriteria(stop_strings=stop_strings, tokenizer=tokenizer))
    return criteria


@dataclass
class _Stream:
    """One model's view of the rows it runs on: its own ids, cache and mask."""

    name: str
    model: Any
    rows: torch.Tensor  # (R,) batch rows, ascending
    input_ids: torch.Tensor  # (R, T_model)
    model_kwargs: dict
    logits: torch.Tensor | None = None  # (R, V_model) at the last position

    def step(self, next_tokens: torch.Tensor) -> None:
        """Append this model's rows of ``next_tokens`` (B,) and run one position."""
        own_tokens = next_tokens[self.rows.to(next_tokens.device)].to(self.input_ids.device)
        self.input_ids = torch.cat([self.input_ids, own_tokens[:, None]], dim=-1)
        model_inputs = self.model.prepare_inputs_for_generation(
            self.input_ids, next_sequence_length=1, **self.model_kwargs
        )
        self._absorb(self.model(**model_inputs, return_dict=True))

    def _absorb(self, outputs) -> None:
        self.model_kwargs = self.model._update_model_kwargs_for_generation(
            outputs, self.model_kwargs
        )
        self.logits = outputs.logits[:, -1]


def _open_stream(name, model, template, base_ids, base_mask, rows, generation_config):
    """Prefill ``model`` on its rows' prompts, wrapped in its template."""
    device = model.device
    prompts = []
    for row in rows.tolist():
        prompt = base_ids[row][base_mask[row].bool()].tolist()
        prompts.append(template.wrap(prompt) if template is not None else prompt)

    pad_id = model.generation_config.pad_token_id
    input_ids, attention_mask = left_pad(prompts, 0 if pad_id is None else int(pad_id))
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

    model_kwargs = {"attention_mask": attention_mask, "use_cache": True}
    model_kwargs["position_ids"] = model._prepare_position_ids_for_generation(
        input_ids, model_kwargs
    )
    if model._supports_logits_to_keep():
        model_kwargs["logits_to_keep"] = 1

    stream = _Stream(name, model, rows, input_ids, model_kwargs)
    stream._absorb(model._prefill(input_ids, generation_config, model_kwargs))
    return stream


def _resolve_plan(steerer, batch_size, expert, alpha, steering, router, signal_values):
    """The caller's steering choice as a plan over the (expanded) batch."""
    given = [x is not None for x in (expert, steering, router)]
    if sum(given) > 1:
        raise ValueError("Choose steering with one of expert=, steering= or router=.")
    if router is not None:
        from proxytune.routing.routers import align_plan

        return align_plan(router.route(signal_values), steerer.pair_names)
    if steering is not None:
        unknown = set(steering.pair_names) - set(steerer.pair_names)
        if unknown:
            raise ValueError(f"The plan names unknown experts {sorted(unknown)}.")
        return steering
    if expert is None and alpha is not None:
        raise ValueError("alpha= needs expert= to say which pair it scales.")
    return steerer.plan(batch_size, expert, alpha)


def _expand_rows(plan: SteeringPlan, batch_size: int) -> SteeringPlan:
    """Repeat the plan's rows when num_return_sequences expanded the batch."""
    if plan.batch_size == batch_size:
        return plan
    if batch_size % plan.batch_size:
        raise ValueError(
            f"The steering plan has {plan.batch_size} rows but the batch has {batch_size}."
        )
    return plan.repeat_rows(batch_size // plan.batch_size)


def _row_seeds(seed, batch_size, device) -> torch.Tensor | None:
    if seed is None:
        return None
    seeds = torch.as_tensor(seed, dtype=torch.int64).flatten()
    if seeds.numel() == 1:
        seeds = seeds.expand(batch_size)
    if seeds.numel() != batch_size:
        raise ValueError(f"Got {seeds.numel()} seeds for a batch of {batch_size} rows.")
    return seeds.to(device)


def _any_nan(base_logits: torch.Tensor, pair_streams) -> torch.Tensor:
    """A 0-d bool tensor on the base's device: does any model's last logits hold NaN?

    Computed on the device without waiting for it, so the kernel path can read
    it after the kernels have been queued.
    """
    flags = [torch.isnan(base_logits).any()]
    for streams, _ in pair_streams:
        flags += [torch.isnan(stream.logits).any().to(base_logits.device) for stream in streams]
    return torch.stack(flags).any()


def _raise_if_not_finite(base_logits: torch.Tensor, pair_streams) -> None:
    """Name the first model whose last logits hold NaN (costs one host sync each)."""
    named_logits = {"base": base_logits}
    for streams, _ in pair_streams:
        named_logits.update({stream.name: stream.logits for stream in streams})
    for name, logits in named_logits.items():
        if torch.isnan(logits).any():
            raise FloatingPointError(
                f"The {name} model produced NaN logits. Check its weights and dtype "
                "(float16 overflow is a common cause; try bfloat16 or float32)."
            )


def _choose_backend(device: torch.device, backend: str | None) -> str:
    if backend is not None:
        if backend not in ("torch", "triton"):
            raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}.")
        return backend
    try:
        from proxytune.sampling.triton_backend import choose_backend
    except ImportError:
        return "torch"
    return choose_backend(device)


def decode(
    model,
    input_ids: torch.Tensor,
    logits_processor,
    stopping_criteria,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    *,
    steerer: ProxyTunedModel,
    expert=None,
    alpha=None,
    steering: SteeringPlan | None = None,
    router=None,
    prompts: Sequence[str] | None = None,
    seed=None,
    backend: str | None = None,
    streamer=None,
    **model_kwargs,
):
    """The proxy-tuned decoding loop, called by ``base.generate()``.

    ``model`` is the base; ``input_ids`` (B, T) and ``model_kwargs`` come as
    Hugging Face prepared them (left padded, expanded for
    ``num_return_sequences``).  See the module docstring for the steps.
    """
    batch_size = input_ids.shape[0]
    device = input_ids.device
    pad_token_id = generation_config._pad_token_tensor
    has_eos_criteria = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    want_scores = generation_config.return_dict_in_generate and generation_config.output_scores
    want_logits = generation_config.return_dict_in_generate and generation_config.output_logits
    scores, raw_logits = [], []
    vocab_size = steerer.vocab_size()
    backend = _choose_backend(device, backend)
    seeds = _row_seeds(seed, batch_size, device)

    base_mask = model_kwargs.get("attention_mask")
    if base_mask is None:
        base_mask = torch.ones_like(input_ids)

    # 1. The base's prefill, with hidden states if the router reads them.
    signal = getattr(router, "signal", None)
    wants_hidden = bool(getattr(signal, "needs_base_hidden_states", False))
    if wants_hidden:
        model_kwargs["output_hidden_states"] = True
    outputs = model._prefill(input_ids, generation_config, model_kwargs)
    model_kwargs.pop("output_hidden_states", None)

    # 2. The per-row plan.
    signal_values = None
    if router is not None:
        if signal is None:  # e.g. an oracle that already knows each row's choice
            signal_values = torch.empty(batch_size, 0, device=device)
        elif wants_hidden:
            hidden = outputs.hidden_states[signal.layer]
            signal_values = signal.pool(hidden, base_mask)
        else:
            if prompts is None:
                raise ValueError("This router embeds prompt text: pass prompts=[...].")
            signal_values = signal.embed(list(prompts)).to(device)
            signal_values = signal_values.repeat_interleave(batch_size // len(prompts), 0)
    plan = _resolve_plan(steerer, batch_size, expert, alpha, steering, router, signal_values)
    plan = _expand_rows(plan, batch_size)
    if logger.isEnabledFor(logging.DEBUG):  # reading the plan back costs a host sync
        logger.debug("Steering plan: %s", plan.alpha.tolist())

    # 3. One stream per model of each pair, on that pair's rows only.
    pair_streams: list[tuple[list[_Stream], SteeringOffset]] = []
    plan_alpha = plan.alpha.to(device)
    for index, name in enumerate(plan.pair_names):
        rows = plan.rows_of(index)
        if rows.numel() == 0:
            continue
        pair = steerer.pairs[name]
        streams = [
            _open_stream(f"{name}.{role}", m, template, input_ids, base_mask, rows,
                         generation_config)
            for role, m, template in pair.models()
        ]
        row_map = torch.full((batch_size,), -1, dtype=torch.int32, device=device)
        row_map[rows.to(device)] = torch.arange(rows.numel(), dtype=torch.int32, device=device)
        offset = SteeringOffset(None, None, row_map, plan_alpha[:, index].contiguous())
        pair_streams.append((streams, offset))

    # A compiled forward when transformers would compile one (a static cache on a GPU).
    base_forward = model.__call__
    if model._valid_auto_compile_criteria(model_kwargs, generation_config):
        base_forward = model.get_compiled_call(generation_config.compile_config)

    unfinished = torch.ones(batch_size, dtype=torch.long, device=device)
    positions = base_mask.sum(-1).to(torch.int64)
    model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
    base_logits = outputs.logits[:, -1]
    del outputs

    while True:
        # 4. Fuse and pick.
        for streams, offset in pair_streams:
            offset.expert_logits = streams[0].logits.to(device)
            offset.anti_logits = streams[1].logits.to(device) if len(streams) > 1 else None
        if backend == "torch":
            _raise_if_not_finite(base_logits, pair_streams)
        else:  # flagged now, read once the kernels are queued (one wait per step)
            nan_seen = _any_nan(base_logits, pair_streams)

        selection = select_next_tokens(
            base_logits, [offset for _, offset in pair_streams], vocab_size, input_ids,
            logits_processor, generation_config.do_sample, positions, seeds, backend,
            return_scores=want_scores, return_logits=want_logits,
        )
        next_tokens = selection.tokens
        if backend == "triton" and nan_seen:  # before any token of this step is kept
            _raise_if_not_finite(base_logits, pair_streams)
        if want_scores:
            scores.append(selection.scores)
        if want_logits:
            raw_logits.append(selection.logits)

        # 5. Append, stop, stream, advance every model one position.
        if has_eos_criteria:
            next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        positions = positions + 1
        unfinished = unfinished & ~stopping_criteria(input_ids, tuple(scores))
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if unfinished.max() == 0:
            break

        model_inputs = model.prepare_inputs_for_generation(
            input_ids, next_sequence_length=1, **model_kwargs
        )
        outputs = base_forward(**model_inputs, return_dict=True)
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
        base_logits = outputs.logits[:, -1]
        del outputs
        for streams, _ in pair_streams:
            for stream in streams:
                stream.step(next_tokens)

    if streamer is not None:
        streamer.end()

    if not generation_config.return_dict_in_generate:
        return input_ids
    return GenerateDecoderOnlyOutput(
        sequences=input_ids,
        scores=tuple(scores) if want_scores else None,
        logits=tuple(raw_logits) if want_logits else None,
        cache=model_kwargs.get("cache"),
    )
