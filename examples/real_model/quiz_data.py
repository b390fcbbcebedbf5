"""Real data from Debian packages: capital quizzes, fortunes and WordNet glosses.

``apt-get download`` fetches the ``.deb`` files into a temporary folder and
``dpkg -x`` unpacks them under ``<work>/debian_root``; nothing is installed
system-wide.  When the packages are already installed, their files under
``/`` are used instead.  ``apt-get update`` must have run once on the machine.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from quiz import QuizItem, capital_items, other_quiz_items, split_items

DEBIAN_PACKAGES = ("bsdgames", "fortunes-min", "fortunes", "wordnet-base")
QUIZ_SUBDIR = Path("usr/share/games/bsdgames/quiz")
FORTUNE_SUBDIR = Path("usr/share/games/fortunes")
WORDNET_SUBDIR = Path("usr/share/wordnet")
WORDNET_PARTS = ("noun", "verb", "adj", "adv")


def _has_all_data(root: Path) -> bool:
    return all((root / sub).is_dir() for sub in (QUIZ_SUBDIR, FORTUNE_SUBDIR, WORDNET_SUBDIR))


def fetch_debian_data(work_dir: Path) -> Path:
    """A root folder holding the quiz, fortune and WordNet files; downloads if needed."""
    unpacked = Path(work_dir) / "debian_root"
    if _has_all_data(unpacked):
        return unpacked
    if _has_all_data(Path("/")):
        return Path("/")
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise RuntimeError(
                f"{tool} is not available. This example reads Debian's packages "
                f"{', '.join(DEBIAN_PACKAGES)}; on another system, unpack them under "
                f"{unpacked} by hand."
            )

    unpacked.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download_dir:
        done = subprocess.run(["apt-get", "download", *DEBIAN_PACKAGES], cwd=download_dir,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"apt-get download {' '.join(DEBIAN_PACKAGES)} failed:\n{done.stderr}\n"
                "Run 'apt-get update' once (as root) and try again."
            )
        for deb in sorted(Path(download_dir).glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], check=True)
    if not _has_all_data(unpacked):
        raise RuntimeError(f"The unpacked packages under {unpacked} lack the expected files.")
    return unpacked


def fortunes(root: Path) -> list[str]:
    """Every fortune (the ``%``-separated entries) of the plain-text fortune files."""
    entries = []
    for path in sorted((root / FORTUNE_SUBDIR).iterdir()):
        if not path.is_file() or path.suffix in (".dat", ".u8"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for entry in re.split(r"^%\s*$", text, flags=re.MULTILINE):
            entry = entry.strip()
            if entry:
                entries.append(entry)
    return entries


def wordnet_glosses(root: Path) -> list[str]:
    """``"word: gloss"`` for each WordNet synset, underscores read as spaces."""
    glosses = []
    for part in WORDNET_PARTS:
        for line in (root / WORDNET_SUBDIR / f"data.{part}").read_text(
            encoding="utf-8", errors="replace"
        ).splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # the licence header
            fields, gloss = line.split("|", 1)
            words = fields.split()
            word = words[4].replace("_", " ")
            glosses.append(f"{word}: {gloss.strip()}")
    return glosses


def prose_documents(root: Path, max_documents: int, seed: int = 0) -> list[str]:
    """Up to ``max_documents`` texts, half fortunes and half WordNet glosses, shuffled.

    Texts that mention a capital are left out (WordNet glosses such as "the
    capital of Armenia"), so that the small pair learns no capitals from prose.
    """
    rng = random.Random(seed)
    fortune_texts, gloss_texts = fortunes(root), wordnet_glosses(root)
    fortune_texts = [text for text in fortune_texts if "capital" not in text.lower()]
    gloss_texts = [text for text in gloss_texts if "capital" not in text.lower()]
    rng.shuffle(fortune_texts)
    rng.shuffle(gloss_texts)
    half = max_documents // 2
    documents = fortune_texts[:half] + gloss_texts[: max_documents - min(half, len(fortune_texts))]
    rng.shuffle(documents)
    return documents


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def prepare_data(work_dir: Path, max_prose_documents: int = 4000, seed: int = 0) -> dict:
    """Write ``capitals_train.jsonl``, ``capitals_test.jsonl``, ``other_quizzes.jsonl``
    (short-answer items of the other quizzes) and ``prose.jsonl``.

    Returns counts for the report.
    """
    data_dir = Path(work_dir) / "data"
    root = fetch_debian_data(work_dir)
    items = capital_items(root / QUIZ_SUBDIR)
    train, test = split_items(items, seed=seed)
    write_jsonl(data_dir / "capitals_train.jsonl", (item.to_dict() for item in train))
    write_jsonl(data_dir / "capitals_test.jsonl", (item.to_dict() for item in test))
    others = other_quiz_items(root / QUIZ_SUBDIR)  # filtered against held-out capitals later
    write_jsonl(data_dir / "other_quizzes.jsonl", (item.to_dict() for item in others))
    prose = prose_documents(root, max_prose_documents, seed=seed)
    write_jsonl(data_dir / "prose.jsonl", ({"text": text} for text in prose))
    return {"debian_root": str(root), "questions": len(items), "train": len(train),
            "test": len(test), "other_quiz_items": len(others),
            "prose_documents": len(prose),
            "prose_chars": sum(len(text) for text in prose)}


def load_items(path: Path) -> list[QuizItem]:
    return [QuizItem(**row) for row in read_jsonl(path)]
