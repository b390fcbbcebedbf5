"""BSD ``quiz`` data files: expanding their answer patterns and scoring answers.

A line of a quiz file holds ``:``-separated fields, each a pattern of the
accepted spellings.  ``{x}`` marks optional text, ``a|b`` alternatives
(inside ``[...]`` or ``{...}`` they stay local to the group) and ``\\``
quotes the next character.  Accents are typed inside a group as a mark
overstruck on a letter with a backspace, in either order:
``Yaound['\be|e\b'|e]`` accepts "Yaoundé" and "Yaounde".

Every expansion keeps one order: optional text present before absent, and
alternatives in written order.  The first spelling is thus the fullest
written form, which we use as the training target.
"""

from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

# Accent codes inside a [...] group: a mark and a letter, in either order, usually with
# a backspace between them (an overstrike on a teletype).
COMBINING_MARKS = {
    "'": "\u0301",  # acute
    "`": "\u0300",  # grave
    "^": "\u0302",  # circumflex
    "~": "\u0303",  # tilde
    ",": "\u0327",  # cedilla
    '"': "\u0308",  # diaeresis
    "°": "\u030a",  # ring above
}
SLASHED_LETTERS = {"o": "ø", "O": "Ø"}
# Letters that have no decomposition but should match their plain spelling.
PLAIN_SPELLINGS = str.maketrans({"ø": "o", "Ø": "O", "ß": "ss", "æ": "ae", "Æ": "AE",
                                 "đ": "d", "ł": "l", "Ł": "L", "ı": "i"})

# The capital quizzes, with how a question names the place of each file.
CAPITAL_QUIZZES = {
    "africa": "What is the capital of {place}?",
    "america": "What is the capital of {place}?",
    "asia": "What is the capital of {place}?",
    "europe": "What is the capital of {place}?",
    "province": "What is the capital of {place}?",
    "state": "What is the capital of the US state of {place}?",
}


def _accented(code: str) -> str:
    """``'\be``, ``e\b'`` or ``'e`` as "é"; anything else unchanged."""
    code = code.replace("\b", "")
    if len(code) != 2:
        return code
    for mark, letter in (code, code[::-1]):
        if mark in COMBINING_MARKS and letter.isalpha():
            return unicodedata.normalize("NFC", letter + COMBINING_MARKS[mark])
        if mark == "/" and letter in SLASHED_LETTERS:
            return SLASHED_LETTERS[letter]
    return code


def _unique(items):
    return list(dict.fromkeys(items))


class _PatternParser:
    """Recursive descent over one field: alternatives of sequences of groups."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def parse(self) -> list[str]:
        spellings = self._alternatives(closer=None)
        if self.pos != len(self.text):
            raise ValueError(f"Unbalanced bracket in quiz pattern {self.text!r}.")
        return spellings

    def _alternatives(self, closer: str | None) -> list[str]:
        options = [self._sequence(closer)]
        while self.pos < len(self.text) and self.text[self.pos] == "|":
            self.pos += 1
            options.append(self._sequence(closer))
        return [spelling for option in options for spelling in option]

    def _sequence(self, closer: str | None) -> list[str]:
        spellings = [""]
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == "|" or char == closer:
                break
            if char in "]}":
                raise ValueError(f"Unexpected {char!r} in quiz pattern {self.text!r}.")
            self.pos += 1
            if char == "\\" and self.pos < len(self.text):
                piece = [self.text[self.pos]]
                self.pos += 1
            elif char in "{[":
                piece = self._group("}" if char == "{" else "]")
                if char == "{":
                    piece = piece + [""]
            else:
                piece = [char]
            spellings = [head + tail for head in spellings for tail in piece]
        return spellings

    def _group(self, closer: str) -> list[str]:
        inner = self._alternatives(closer)
        if self.pos >= len(self.text) or self.text[self.pos] != closer:
            raise ValueError(f"Missing {closer!r} in quiz pattern {self.text!r}.")
        self.pos += 1
        if closer == "]":
            inner = [_accented(option) for option in inner]
        return _unique(inner)


def expand_pattern(pattern: str) -> list[str]:
    """Every spelling a quiz pattern accepts, fullest written form first.

    >>> expand_pattern("Central Africa{n Rep{ublic}}")
    ['Central African Republic', 'Central African Rep', 'Central Africa']
    """
    return _unique(s.strip() for s in _PatternParser(pattern).parse() if s.strip())


def split_fields(line: str) -> list[str]:
    """Split a quiz line at the ``:`` that are outside groups and not quoted."""
    fields, depth, start, pos = [], 0, 0, 0
    while pos < len(line):
        char = line[pos]
        if char == "\\":
            pos += 2
            continue
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        elif char == ":" and depth == 0:
            fields.append(line[start:pos])
            start = pos + 1
        pos += 1
    fields.append(line[start:])
    return fields


def normalize_answer(text: str) -> str:
    """Lower case, accents and punctuation dropped, spaces collapsed."""
    text = unicodedata.normalize("NFKD", text.translate(PLAIN_SPELLINGS))
    text = "".join(char for char in text if not unicodedata.combining(char))
    return re.sub(r"[^0-9a-z]+", " ", text.lower()).strip()


def first_line(generated: str) -> str:
    """The model's answer: its first non-empty line, stripped."""
    for line in generated.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


@dataclass
class QuizItem:
    """One question with every accepted answer; ``answer`` is the target spelling."""

    question: str
    answer: str
    accepted: list[str] = field(default_factory=list)
    source: str = ""

    def is_correct(self, generated: str) -> bool:
        """Exact match of the first line of ``generated`` against any accepted spelling."""
        said = normalize_answer(first_line(generated))
        return bool(said) and said in {normalize_answer(a) for a in self.accepted}

    def is_mentioned(self, generated: str) -> bool:
        """Looser than exact match: an accepted spelling appears as whole words anywhere."""
        said = f" {normalize_answer(generated)} "
        return any(f" {normalize_answer(a)} " in said for a in self.accepted if a.strip())

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.answer,
                "accepted": self.accepted, "source": self.source}


def read_quiz_lines(path: Path) -> list[str]:
    """Lines of a quiz file with ``\\``-continued lines joined.

    Debian's files are UTF-8 (the ring of "Åland" is ``°``); older copies may
    be Latin-1, read as such when they are not valid UTF-8.
    """
    raw_bytes = Path(path).read_bytes()
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError:
        text = raw_bytes.decode("latin-1")
    lines, pending = [], ""
    for raw in text.splitlines():
        if raw.endswith("\\") and not raw.endswith("\\\\"):
            pending += raw[:-1]
            continue
        lines.append(pending + raw)
        pending = ""
    return [line for line in lines if line.strip()]


def capital_items(quiz_dir: Path, quizzes: dict[str, str] = CAPITAL_QUIZZES) -> list[QuizItem]:
    """One item per distinct question over the capital quizzes, answers merged.

    The place is named by its longest accepted spelling (``Alabama`` rather
    than ``AL``); a place listed in two files (Armenia, in Asia and Europe)
    keeps one question with the union of the accepted answers.
    """
    by_question: dict[str, QuizItem] = {}
    for name, question_form in quizzes.items():
        for line in read_quiz_lines(Path(quiz_dir) / name):
            fields = split_fields(line)
            if len(fields) < 2:
                continue
            places, answers = expand_pattern(fields[0]), expand_pattern(fields[1])
            if not places or not answers:
                continue
            place = max(places, key=len)
            question = question_form.format(place=place)
            if question in by_question:
                item = by_question[question]
                item.accepted = _unique(item.accepted + answers)
            else:
                by_question[question] = QuizItem(question, answers[0], answers, name)
    return list(by_question.values())


def split_items(items: list[QuizItem], seed: int = 0) -> tuple[list[QuizItem], list[QuizItem]]:
    """Halves for training and held-out evaluation, shuffled with ``seed``."""
    ordered = sorted(items, key=lambda item: item.question)
    random.Random(seed).shuffle(ordered)
    half = len(ordered) // 2
    return ordered[:half], ordered[half:]


# Other quizzes of the same package, for teaching the expert the short-answer format on
# facts other than capitals: (file, question with {field}, answer field).  The question
# names the item by the longest spelling of its field, the answer is the first spelling.
OTHER_QUIZZES = (
    ("elements", "What is the chemical symbol for {3}?", 0),
    ("elements", "What is the atomic number of {3}?", 1),
    ("elements", "Which chemical element has the symbol {0}?", 3),
    ("state", "What is the postal abbreviation of the US state of {0}?", 2),
    ("state", "What is the state flower of {0}?", 3),
    ("babies", "What is a young {1} called?", 0),
    ("collectives", "What is a group of {0} called?", 1),
    ("sexes", "What is the female counterpart of a {0}?", 1),
    ("latin", "What does the Latin word {0} mean?", 1),
    ("pres", "Which US president came after {0}?", 3),
    ("pres", "Who was vice president under {0}?", 2),
    ("posneg", "What is the opposite of {0}?", 1),
    ("murders", "Who killed {0}?", 1),
    ("sov", "Who succeeded {0} on the English throne?", 2),
    ("inca", "Which Inca ruler succeeded {0}?", 1),
    ("areas", "Which US city has the telephone area code {0}?", 2),
    ("flowers", "In the language of flowers, what does {0} mean?", 1),
    ("chinese", "In the Chinese zodiac, which year follows the year of the {0}?", 1),
    ("midearth", "What is the capital of the Middle-earth land of {0}?", 1),
    ("locomotive", "What is the {0} locomotive wheel arrangement called?", 1),
)


def other_quiz_items(quiz_dir: Path, quizzes=OTHER_QUIZZES) -> list[QuizItem]:
    """Short-answer items from the non-capital quizzes; files that are missing are skipped."""
    items: dict[str, QuizItem] = {}
    for name, question_form, answer_field in quizzes:
        path = Path(quiz_dir) / name
        if not path.is_file():
            continue
        for line in read_quiz_lines(path):
            fields = split_fields(line)
            used = [int(index) for index in re.findall(r"\{(\d+)\}", question_form)]
            if len(fields) <= max(used + [answer_field]):
                continue
            try:
                names = {index: expand_pattern(fields[index]) for index in used}
                answers = expand_pattern(fields[answer_field])
            except ValueError:
                continue
            if not answers or not all(names.values()):
                continue
            question = re.sub(r"\{(\d+)\}", lambda m: max(names[int(m.group(1))], key=len),
                              question_form)
            if question not in items:
                items[question] = QuizItem(question, answers[0], answers, name)
    return list(items.values())


def capital_place(item: QuizItem) -> str:
    """The place a capital question asks about ("Alabama" in "... US state of Alabama?")."""
    return re.sub(r"^.* of (the US state of )?", "", item.question).rstrip("?")


def mentions_any(item: QuizItem, held_out: list[QuizItem]) -> bool:
    """Whether ``item``'s question or answers name a place or capital of ``held_out``.

    Used to keep every held-out capital question, and its answer, out of the
    extra training data (area code 608 would teach "Madison").
    """
    words = {normalize_answer(text) for held in held_out
             for text in [capital_place(held), *held.accepted]}
    words.discard("")
    said = " " + " ".join(normalize_answer(text)
                          for text in [item.question, *item.accepted]) + " "
    return any(f" {word} " in said for word in words)
