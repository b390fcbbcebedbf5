"""Save and load routers as a folder of JSON + safetensors (no pickle).

A router folder holds:

* ``router.json``: format name and version, the router kind, its pair
  names, its signal's description, its settings, and for each tensor its
  shape and dtype, plus the SHA-256 of the tensor file;
* ``tensors.safetensors``: the router's tensors.

:func:`load` checks every piece and says which one is wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from proxytune.routing.routers import Router
from proxytune.routing.signals import signal_from_description, signal_mismatches

logger = logging.getLogger(__name__)

FORMAT_NAME = "proxytune-router"
FORMAT_VERSION = 1
CONFIG_FILE = "router.json"
TENSORS_FILE = "tensors.safetensors"


class RouterFolderError(ValueError):
    """A router folder is missing, damaged, or does not fit the signal asked for."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def save(router: Router, directory: str | Path) -> Path:
    """Write ``router`` to ``directory`` (created if needed); returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: value.detach().cpu().contiguous() for name, value in router.tensors().items()
    }
    tensor_path = directory / TENSORS_FILE
    save_file(tensors, str(tensor_path))

    record = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "kind": router.kind,
        "pair_names": router.pair_names,
        "signal": None if router.signal is None else router.signal.describe(),
        "config": router.config(),
        "tensors": {
            name: {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
            for name, value in tensors.items()
        },
        "tensors_sha256": _sha256(tensor_path),
    }
    with open(directory / CONFIG_FILE, "w") as handle:
        json.dump(record, handle, indent=2)
    logger.info("Saved %s router to %s", router.kind, directory)
    return directory


def _read_record(directory: Path) -> dict:
    config_path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise RouterFolderError(f"Router folder {directory} does not exist.")
    if not config_path.is_file():
        raise RouterFolderError(
            f"{directory} is not a router folder: {CONFIG_FILE} is missing. "
            "Create one with `proxytune router fit ... --out DIR`."
        )
    try:
        with open(config_path) as handle:
            record = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RouterFolderError(f"{config_path} is not valid JSON ({error}); refit the router.")

    if not isinstance(record, dict) or record.get("format") != FORMAT_NAME:
        raise RouterFolderError(f"{config_path} is not a proxytune router description.")
    if record.get("version") != FORMAT_VERSION:
        raise RouterFolderError(
            f"{config_path} has router format version {record.get('version')!r}; this "
            f"proxytune reads version {FORMAT_VERSION}. Refit the router with this version."
        )
    required = ("kind", "pair_names", "signal", "config", "tensors", "tensors_sha256")
    missing = [key for key in required if key not in record]
    if missing:
        raise RouterFolderError(f"{config_path} lacks the fields {missing}; refit the router.")
    if record["kind"] not in Router.registry:
        raise RouterFolderError(
            f"{config_path} holds a router of unknown kind {record['kind']!r}; known kinds: "
            f"{sorted(Router.registry)}."
        )
    return record


def _read_tensors(directory: Path, record: dict) -> dict[str, torch.Tensor]:
    tensor_path = directory / TENSORS_FILE
    if not tensor_path.is_file():
        raise RouterFolderError(f"Router folder {directory} lacks {TENSORS_FILE}.")
    if _sha256(tensor_path) != record["tensors_sha256"]:
        raise RouterFolderError(
            f"{tensor_path} does not match the checksum recorded in {CONFIG_FILE}: the file "
            "was changed or damaged after saving. Refit or copy the router folder again."
        )
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise RouterFolderError(f"{tensor_path} cannot be read as safetensors ({error}).")

    expected = record["tensors"]
    if set(tensors) != set(expected):
        raise RouterFolderError(
            f"{tensor_path} holds tensors {sorted(tensors)}, {CONFIG_FILE} lists "
            f"{sorted(expected)}."
        )
    for name, spec in expected.items():
        dtype = str(tensors[name].dtype).removeprefix("torch.")
        if list(tensors[name].shape) != spec["shape"] or dtype != spec["dtype"]:
            raise RouterFolderError(
                f"Tensor {name!r} is {dtype}{list(tensors[name].shape)} but {CONFIG_FILE} "
                f"says {spec['dtype']}{spec['shape']}."
            )
    return tensors


def load(
    directory: str | Path,
    expected_signal=None,
    device: str | torch.device = "cpu",
) -> Router:
    """Load the router saved in ``directory`` onto ``device``.

    ``expected_signal`` is the signal the caller will route with: a signal
    object, or a dict with some of kind / model_name / layer / dim / pooling
    (e.g. only the base's name and hidden size).  A router fit on another
    signal is refused, naming each field that differs.  With a signal object
    the router routes with that object (so a moved embedding folder works).
    """
    directory = Path(directory)
    record = _read_record(directory)

    saved_signal = record["signal"]
    if expected_signal is not None:
        expected = (
            expected_signal
            if isinstance(expected_signal, dict)
            else expected_signal.describe()
        )
        if saved_signal is None:
            logger.info("Router in %s ignores the signal; any signal is accepted.", directory)
        else:
            problems = signal_mismatches(expected, saved_signal)
            if problems:
                raise RouterFolderError(
                    f"The router in {directory} was fit on a different signal: "
                    + "; ".join(problems)
                    + ". Refit it on this model's signal, or route with the one it was fit on."
                )

    tensors = _read_tensors(directory, record)
    if saved_signal is None:
        signal = None
    elif expected_signal is not None and not isinstance(expected_signal, dict):
        signal = expected_signal
    else:
        try:
            signal = signal_from_description(saved_signal)
        except (KeyError, ValueError, TypeError) as error:
            raise RouterFolderError(f"The signal recorded in {directory} is unusable: {error}")

    router_class = Router.registry[record["kind"]]
    try:
        router = router_class.from_saved(signal, record["pair_names"], record["config"], tensors)
    except (TypeError, ValueError, KeyError) as error:
        raise RouterFolderError(f"Cannot rebuild the router in {directory}: {error}")
    return router.to(device)
