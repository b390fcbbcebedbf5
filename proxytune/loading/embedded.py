"""The embedded model family that ships inside the package.

``examples/build_family.py`` trains it on the synthetic world of
:mod:`proxytune.experiments.world` and writes ``proxytune/embedded/``:

* ``tokenizer/``: the word-level tokenizer with its chat template;
* ``base/``: the largest model, pre-trained on the whole corpus;
* ``anti/``: a small pre-trained, untuned model, the anti-expert of every
  domain;
* ``expert_<domain>/``: ``anti`` fine-tuned on that domain's chat data;
* ``direct_<domain>/``: ``base`` fine-tuned on the same data, the upper
  reference of the experiments (never used for steering);
* ``router/``: a cluster router fitted on calibration prompts (optional);
* ``steering.json``: each domain's steering strength alpha, chosen on
  validation prompts by the build (optional; 1.0 where absent);
* ``hashes.json``: the sha256 of every file above.

Weights are stored in float16 and loaded in the requested dtype.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from proxytune.loading.local import load_local
from proxytune.steering import ExpertPair

logger = logging.getLogger(__name__)

EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "embedded"


@dataclass
class EmbeddedFamily:
    """The loaded family: tokenizer, base, one expert pair per domain.

    ``direct_dirs[domain]`` is the folder of the directly tuned base, loaded
    on demand by :meth:`load_direct` since only experiments need it.
    ``router_dir`` is the fitted router's folder, or ``None`` when the build
    has none yet.
    """

    folder: Path
    tokenizer: object
    base: torch.nn.Module
    pairs: dict[str, ExpertPair]
    direct_dirs: dict[str, Path] = field(default_factory=dict)
    router_dir: Path | None = None
    dtype: torch.dtype = torch.float32

    def load_direct(self, domain: str) -> torch.nn.Module:
        """The base fine-tuned directly on ``domain``'s chat data."""
        if domain not in self.direct_dirs:
            raise KeyError(
                f"No directly tuned base for {domain!r}; the family has "
                f"{sorted(self.direct_dirs)}."
            )
        with _quiet_loading():
            model, _ = load_local(self.direct_dirs[domain], dtype=self.dtype)
        return model


def load_embedded_family(
    folder: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    alpha: float | None = None,
    check_hashes: bool = False,
) -> EmbeddedFamily:
    """Load the shipped family (or a rebuilt one in ``folder``) in eval mode.

    Every pair steers with ``alpha`` when given, else with its domain's alpha
    in ``steering.json`` (1.0 when the build recorded none).
    Every pair's anti-expert is the same small model object, loaded once.
    With ``check_hashes`` the files are first compared with ``hashes.json``.
    """
    from transformers import AutoTokenizer

    folder = Path(folder) if folder is not None else EMBEDDED_DIR
    if not (folder / "base" / "config.json").is_file():
        raise FileNotFoundError(
            f"No embedded family in {folder} (base/config.json is missing). Rebuild it "
            "with `python examples/build_family.py`, or reinstall proxytune."
        )
    if check_hashes:
        mismatched = verify_hashes(folder)
        if mismatched:
            raise ValueError(
                f"These files of the embedded family differ from hashes.json: {mismatched}. "
                "Reinstall proxytune or rebuild with examples/build_family.py."
            )

    domains = sorted(p.name[len("expert_"):] for p in folder.glob("expert_*") if p.is_dir())
    if not domains:
        raise FileNotFoundError(f"{folder} holds no expert_<domain> folder; rebuild it.")
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    alphas = {domain: 1.0 for domain in domains}
    if (folder / "steering.json").is_file():
        alphas.update(json.loads((folder / "steering.json").read_text())["alpha"])
    if alpha is not None:
        alphas = {domain: alpha for domain in domains}
    with _quiet_loading():
        base, _ = load_local(folder / "base", dtype=dtype)
        anti, _ = load_local(folder / "anti", dtype=dtype)
        pairs = {}
        direct_dirs = {}
        for domain in domains:
            expert, _ = load_local(folder / f"expert_{domain}", dtype=dtype)
            pairs[domain] = ExpertPair(domain, expert, anti, alpha=float(alphas[domain]))
            if (folder / f"direct_{domain}" / "config.json").is_file():
                direct_dirs[domain] = folder / f"direct_{domain}"

    router_dir = folder / "router"
    router_dir = router_dir if router_dir.is_dir() and any(router_dir.iterdir()) else None
    logger.info("Loaded the embedded family from %s (router: %s).", folder, router_dir)
    return EmbeddedFamily(folder, tokenizer, base, pairs, direct_dirs, router_dir, dtype)


@contextlib.contextmanager
def _quiet_loading():
    """Hide Hugging Face's per-file progress bars while the tiny models load."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def verify_hashes(folder: str | Path | None = None) -> list[str]:
    """Files whose sha256 differs from ``hashes.json``, or that are missing.

    Returns an empty list when every recorded file matches.
    """
    folder = Path(folder) if folder is not None else EMBEDDED_DIR
    hash_file = folder / "hashes.json"
    if not hash_file.is_file():
        raise FileNotFoundError(
            f"{hash_file} is missing; rebuild with `python examples/build_family.py`."
        )
    recorded = json.loads(hash_file.read_text())
    mismatched = []
    for relative, expected in sorted(recorded.items()):
        path = folder / relative
        if not path.is_file() or file_sha256(path) != expected:
            mismatched.append(relative)
    return mismatched
