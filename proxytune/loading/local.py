"""Causal LMs saved as Hugging Face folders on local disk.

Nothing here reaches a model hub: a folder either holds ``config.json`` and
its weights, or loading stops with an error that says which part is missing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def check_model_folder(folder: str | Path) -> Path:
    """Return ``folder`` as a Path once it looks like a saved causal LM.

    Raises ``FileNotFoundError`` naming the missing folder, ``config.json`` or
    weight files, so that a typo in a path is not mistaken for a hub name.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"No model folder at {folder}. Give the folder that save_pretrained() "
            "wrote (it holds config.json and *.safetensors)."
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json, so it is not a saved model. "
            "Point at the folder that save_pretrained() wrote."
        )
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise FileNotFoundError(
            f"{folder} has config.json but no weights ({' or '.join(WEIGHT_PATTERNS)}). "
            "The save may have been interrupted: save the model again."
        )
    return folder


def load_local(folder: str | Path, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` from a local folder, in eval mode.

    The tokenizer is ``None`` when the folder holds none (a model saved
    without one can still be steered with the base's tokenizer).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = check_model_folder(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    model.eval()

    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    if any((folder / name).is_file() for name in tokenizer_files):
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    else:
        logger.info("%s holds no tokenizer files; returning tokenizer=None.", folder)
        tokenizer = None
    return model, tokenizer
