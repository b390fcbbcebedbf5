"""A small synthetic world: invented people, their facts, and text about them.

The embedded model family is trained on this world, so that proxy-tuning
experiments run in minutes on a CPU with no model hub.  Everything here is
derived from one seed with :class:`random.Random`, so two calls with the same
seed give the same world, corpus and chat data, string for string.

The world has ``n_people`` invented people.  Each has one value for each of
four attributes (home town, job, favourite colour, pet), drawn from shared
pools, so a fact is a triple ``(person, attribute, value)``.

Texts built from it:

* a **pre-training corpus**: every fact in several declarative sentences,
  two quiz lines (``question : ... answer : ...``), a question-and-answer
  passage in prose, casual dialogues whose replies ramble on in full
  sentences, and filler text; a smaller model's corpus keeps the facts of
  some people only and names the others in passing;
* **chat data** in two instruction domains, each a different skill:

  - ``qa``: "where does kelvor live ?" -> ``"brommel"`` (the bare value);
  - ``choice``: "does kelvor live in dask or in brommel ?" -> ``"brommel"``
    (one of two offered values, in either order).

  Fine-tuning data of a domain mentions only the people of that domain's
  fine-tuning split; held-out prompts and the knowledge probes ask about
  people that no fine-tuning data ever mentions.

The chat format is ``<|user|> question <|assistant|> answer <|end|>``: the
pre-training corpus uses these markers only for casual talk whose replies go
on in full sentences, so an untuned model knows the facts, and can recall
them after a question in the chat markers, but does not use the terse format
that the instruction data teaches.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Collection

logger = logging.getLogger(__name__)

DOMAINS = ("qa", "choice")
# The world the embedded family is trained on (examples/build_family.py).
EMBEDDED_WORLD = dict(seed=0, n_people=160, n_towns=24, finetune_share=0.3)
ATTRIBUTES = ("town", "job", "color", "pet")

USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
SYSTEM = "<|system|>"
PAD, UNK, BOS = "<pad>", "<unk>", "<s>"
SPECIAL_TOKENS = [PAD, UNK, BOS, END, USER, ASSISTANT, SYSTEM]

# Jinja chat template of the shipped tokenizer: one turn per message, and the
# assistant marker alone when a generation prompt is asked for.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|> {{ message['content'] }} "
    "{% elif message['role'] == 'user' %}<|user|> {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}<|assistant|> {{ message['content'] }} <|end|> "
    "{% else %}{{ raise_exception('Unknown chat role: ' + message['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

COLORS = [
    "red", "blue", "green", "yellow", "purple", "orange", "black", "white",
    "grey", "pink", "brown", "teal",
]
JOBS = [
    "baker", "pilot", "farmer", "painter", "doctor", "teacher", "sailor", "miner",
    "tailor", "singer", "judge", "potter", "weaver", "hunter", "cook", "smith",
    "nurse", "poet", "guard", "clerk",
]
PETS = [
    "cat", "dog", "parrot", "rabbit", "turtle", "goat", "horse", "owl", "snake",
    "lizard", "hamster", "duck", "goose", "ferret", "pig", "frog",
]

# Sentence templates per attribute: {p} is the person, {v} the value.
STATEMENTS = {
    "town": [
        "{p} lives in {v} .", "the home of {p} is in {v} .", "{p} has a house in {v} .",
        "in {v} lives {p} .", "{p} grew up in {v} and still lives there .",
    ],
    "job": [
        "{p} works as a {v} .", "{p} is a {v} by trade .", "the job of {p} is {v} .",
        "everyone knows {p} as a {v} .", "{p} earns a living as a {v} .",
    ],
    "color": [
        "the favorite color of {p} is {v} .", "{p} likes the color {v} .",
        "{p} loves anything {v} .", "{v} is the color that {p} likes best .",
        "{p} paints the door {v} , the favorite color .",
    ],
    "pet": [
        "{p} owns a {v} .", "{p} has a pet {v} .", "the pet of {p} is a {v} .",
        "{p} takes care of a {v} at home .", "a {v} lives with {p} .",
    ],
}
QUESTIONS = {
    "town": "where does {p} live ?",
    "job": "what is the job of {p} ?",
    "color": "what color does {p} like ?",
    "pet": "what pet does {p} have ?",
}
CHOICES = {
    "town": "does {p} live in {a} or in {b} ?",
    "job": "is {p} a {a} or a {b} ?",
    "color": "does {p} like {a} or {b} ?",
    "pet": "does {p} own a {a} or a {b} ?",
}
# How casual replies in the corpus begin: mostly with the answer word, else
# with a filler word; all go on in full sentences, so an untuned model that
# knows the fact still never gives the bare answer and stops.
REPLY_STYLES = [
    "{v} . {s}", "{v} , i think . {s}", "{v} , of course . {s}", "{v} ! {s}",
    "{v} , as far as i know . {s}", "oh , {v} ! {s}", "hmm , {s}",
    "well , {s} i am quite sure .",
]
# Question-and-answer prose: a question about a fact and its answer in plain
# text, with no chat markers ({q} the question, {s} a statement of the fact).
QA_PROSE = [
    "q : {q} a : {s}", "someone asked : {q} the reply was : {s}",
    "{q} people say that {s}", "a reader wrote : {q} and the answer came back : {s}",
]
# Plain-text prefixes whose next word is the value: the knowledge probes.
PROBES = {
    "town": "{p} lives in",
    "job": "{p} works as a",
    "color": "the favorite color of {p} is",
    "pet": "{p} owns a",
}

FILLER_SUBJECTS = ["the river", "the old road", "a small boat", "the market", "the wind",
                   "the night", "a quiet bell", "the long winter", "the hill", "a letter"]
FILLER_VERBS = ["runs past", "waits near", "turns toward", "falls over", "sings about",
                "rests beside", "moves across", "shines on"]
FILLER_OBJECTS = ["the bridge", "the field", "the gate", "the stones", "the tower",
                  "the forest", "the harbor", "the square"]
SMALL_TALK = [
    ("hello !", "hello , nice to meet you . how can i help you today ?"),
    ("how are you ?", "i am well , thank you for asking . the day is going fine ."),
    ("thank you .", "you are welcome , it was a pleasure to help ."),
    ("tell me a story .", "once a small boat waited near the bridge , and the wind sang ."),
    ("what time is it ?", "i am not sure , but the night is still long ."),
    ("good night .", "good night , rest well and see you tomorrow ."),
]
SYLLABLES_START = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
                   "br", "dr", "gr", "kr", "tr", "st", "sk", "th"]
SYLLABLES_VOWEL = ["a", "e", "i", "o", "u", "ai", "ou", "ei"]
SYLLABLES_END = ["", "n", "r", "l", "s", "k", "m", "th", "x"]


@dataclass(frozen=True)
class ChatExample:
    """One instruction: the user's text, the exact answer, and where it came from."""

    domain: str
    prompt: str
    answer: str
    person: str
    attribute: str


@dataclass(frozen=True)
class KnowledgeProbe:
    """A plain-text prefix whose correct next word is ``answer``."""

    prompt: str
    answer: str
    person: str
    attribute: str


@dataclass
class World:
    """The invented people, their facts, and the splits of people by use.

    ``facts[person][attribute]`` is the value.  ``finetune_people[domain]``
    are the only people that domain's fine-tuning data mentions; the
    ``heldout_people`` are never mentioned by any fine-tuning data and feed
    the held-out prompts and the knowledge probes.  A seeded share of them,
    the ``validation_people``, is set aside for choosing settings (such as
    the steering strength); the others are the test people.
    """

    seed: int
    people: list[str]
    towns: list[str]
    facts: dict[str, dict[str, str]]
    finetune_people: dict[str, list[str]] = field(default_factory=dict)
    heldout_people: list[str] = field(default_factory=list)
    validation_people: list[str] = field(default_factory=list)

    def values(self, attribute: str) -> list[str]:
        """Every value an attribute can take."""
        pools = {"town": self.towns, "job": JOBS, "color": COLORS, "pet": PETS}
        if attribute not in pools:
            raise KeyError(f"Unknown attribute {attribute!r}; the world has {ATTRIBUTES}.")
        return pools[attribute]

    def pretraining_documents(
        self,
        statements_per_fact: int = 3,
        people: Collection[str] | None = None,
        mentions_per_person: int = 4,
    ) -> list[str]:
        """The pre-training corpus as short documents, in a seeded order.

        Each fact appears in ``statements_per_fact`` declarative sentences
        (different templates), one quiz line asking for it, one asking to
        choose it among two values, one question-and-answer passage in prose,
        and two casual dialogues in the chat markers (one asking for it, one
        offering two values), each answered at length in a varied style;
        small talk and filler add the rest.
        Fine-tuning splits play no role here.

        ``people`` keeps the documents of those people only (filler and small
        talk stay whole): the smaller corpus of a smaller model, which
        therefore knows fewer facts (see :meth:`small_model_people`).  Every
        other person still appears by name, in ``mentions_per_person``
        sentences that state none of their facts, as a real corpus names
        many people it says little about.
        """
        if statements_per_fact < 1:
            raise ValueError("statements_per_fact must be at least 1.")
        covered = set(self.people if people is None else people)
        unknown = covered - set(self.people)
        if unknown:
            raise ValueError(f"people not in this world: {sorted(unknown)[:5]}")
        rng = random.Random(self.seed * 1000 + 1)
        documents = []

        for person in self.people:
            person_documents = []
            for attribute in ATTRIBUTES:
                value = self.facts[person][attribute]
                templates = rng.sample(STATEMENTS[attribute], statements_per_fact)
                person_documents += [t.format(p=person, v=value) for t in templates]

                question = QUESTIONS[attribute].format(p=person)
                person_documents.append(f"question : {question} answer : {value} .")
                choice = self._choice_prompt(rng, person, attribute)
                person_documents.append(f"question : {choice} answer : {value} .")

                # Question-and-answer prose about the fact, without markers.
                sentence = rng.choice(STATEMENTS[attribute]).format(p=person, v=value)
                prose = rng.choice(QA_PROSE).format(q=rng.choice([question, choice]),
                                                    s=sentence)
                person_documents.append(prose)

                # Casual talk in the chat markers: the fact asked both ways,
                # each answered at length in a varied style.
                for asked in (question, self._choice_prompt(rng, person, attribute)):
                    sentence = rng.choice(STATEMENTS[attribute]).format(p=person, v=value)
                    reply = rng.choice(REPLY_STYLES).format(v=value, s=sentence)
                    person_documents.append(f"{USER} {asked} {ASSISTANT} {reply} {END}")

            # Draws happen for every person, so a subset keeps the same texts.
            if person in covered:
                documents += person_documents
            else:
                documents += self._passing_mentions(person, mentions_per_person)

        for _ in range(len(self.people)):
            documents.append(self._filler_sentence(rng))
        for _ in range(len(self.people) // 2):
            user_text, reply = rng.choice(SMALL_TALK)
            documents.append(f"{USER} {user_text} {ASSISTANT} {reply} {END}")

        rng.shuffle(documents)
        return documents

    def chat_examples(self, domain: str, split: str) -> list[ChatExample]:
        """Instructions of one domain for one split of people.

        ``split`` is ``"finetune"`` (the domain's fine-tuning people, every
        attribute; ``choice`` asks each fact twice, with two seeded wrong
        values) or ``"heldout"`` (people no fine-tuning data mentions, one
        question per fact); ``"validation"`` and ``"test"`` are the held-out
        prompts about the validation people and about the others.
        """
        if domain not in DOMAINS:
            raise ValueError(f"Unknown domain {domain!r}; choose one of {DOMAINS}.")
        if split in ("validation", "test"):
            validation = set(self.validation_people)
            return [e for e in self.chat_examples(domain, "heldout")
                    if (e.person in validation) == (split == "validation")]
        if split == "finetune":
            people = self.finetune_people[domain]
        elif split == "heldout":
            people = self.heldout_people
        else:
            raise ValueError(f"Unknown split {split!r}; choose 'finetune', 'heldout', "
                             "'validation' or 'test'.")
        rng = random.Random(f"{self.seed}-{domain}-{split}")
        examples = []

        for person in people:
            for attribute in ATTRIBUTES:
                value = self.facts[person][attribute]
                if domain == "qa":
                    prompt = QUESTIONS[attribute].format(p=person)
                    examples.append(ChatExample(domain, prompt, value, person, attribute))
                    continue
                for _ in range(2 if split == "finetune" else 1):
                    prompt = self._choice_prompt(rng, person, attribute)
                    examples.append(ChatExample(domain, prompt, value, person, attribute))

        rng.shuffle(examples)
        return examples

    def small_model_people(self, heldout_share: float) -> list[str]:
        """The people a smaller model reads about: every fine-tuning person,
        and a seeded ``heldout_share`` of the held-out people.

        The fine-tuning data then asks only about facts the small model has
        read, as instruction data mostly does for a real pre-trained model:
        tuning teaches the answer format rather than guessing, and the
        held-out people it has never read about stay for the base to know.
        """
        if not 0.0 <= heldout_share <= 1.0:
            raise ValueError(f"heldout_share must be in [0, 1], got {heldout_share}.")
        count = round(heldout_share * len(self.heldout_people))
        chosen = random.Random(f"{self.seed}-small").sample(self.heldout_people, count)
        tuned = [p for domain in DOMAINS for p in self.finetune_people[domain]]
        return sorted(tuned + chosen)

    def knowledge_probes(self) -> list[KnowledgeProbe]:
        """Plain-text completions of every held-out fact, in a seeded order."""
        probes = [
            KnowledgeProbe(PROBES[a].format(p=p), self.facts[p][a], p, a)
            for p in self.heldout_people for a in ATTRIBUTES
        ]
        random.Random(f"{self.seed}-probes").shuffle(probes)
        return probes

    def _choice_prompt(self, rng: random.Random, person: str, attribute: str) -> str:
        """A question offering the true value and a wrong one, in a seeded order."""
        value = self.facts[person][attribute]
        wrong = rng.choice([v for v in self.values(attribute) if v != value])
        first, second = (value, wrong) if rng.random() < 0.5 else (wrong, value)
        return CHOICES[attribute].format(p=person, a=first, b=second)

    def _passing_mentions(self, person: str, count: int) -> list[str]:
        """``count`` filler sentences about ``person`` that state no fact."""
        rng = random.Random(f"{self.seed}-mentions-{person}")
        return [f"{person} {rng.choice(FILLER_VERBS)} {rng.choice(FILLER_OBJECTS)} ."
                for _ in range(count)]

    @staticmethod
    def _filler_sentence(rng: random.Random) -> str:
        return (f"{rng.choice(FILLER_SUBJECTS)} {rng.choice(FILLER_VERBS)} "
                f"{rng.choice(FILLER_OBJECTS)} .")


def generate_world(
    seed: int = 0,
    n_people: int = 160,
    n_towns: int = 24,
    finetune_share: float = 0.3,
    validation_share: float = 0.25,
) -> World:
    """A seeded world: people, towns and facts, and the people split by use.

    ``finetune_share`` of the people go to each domain's fine-tuning split
    (disjoint across domains); the rest are held out from all fine-tuning,
    and ``validation_share`` of those are the validation people.
    """
    if not 0.0 <= validation_share < 1.0:
        raise ValueError(f"validation_share must be in [0, 1), got {validation_share}.")
    if n_people < 4 * len(DOMAINS):
        raise ValueError(f"n_people must be at least {4 * len(DOMAINS)}, got {n_people}.")
    if not 0 < finetune_share * len(DOMAINS) < 1:
        raise ValueError(
            f"finetune_share={finetune_share} leaves no held-out people with "
            f"{len(DOMAINS)} domains; use a share below {1 / len(DOMAINS):.2f}."
        )
    rng = random.Random(seed)
    reserved = set(COLORS + JOBS + PETS)
    names = _invent_names(rng, n_people + n_towns, reserved)
    people, towns = names[:n_people], names[n_people:]

    facts = {
        person: {
            "town": rng.choice(towns),
            "job": rng.choice(JOBS),
            "color": rng.choice(COLORS),
            "pet": rng.choice(PETS),
        }
        for person in people
    }

    shuffled = list(people)
    rng.shuffle(shuffled)
    per_domain = int(round(finetune_share * n_people))
    finetune_people = {
        domain: sorted(shuffled[i * per_domain:(i + 1) * per_domain])
        for i, domain in enumerate(DOMAINS)
    }
    heldout = sorted(shuffled[len(DOMAINS) * per_domain:])
    logger.info("World seed %d: %d people, %d towns, %d held out.",
                seed, n_people, n_towns, len(heldout))
    # A separate generator, so that the facts and splits above stay the same.
    count = round(validation_share * len(heldout))
    validation = sorted(random.Random(f"{seed}-validation").sample(heldout, count))
    return World(seed, people, towns, facts, finetune_people, heldout, validation)


def _invent_names(rng: random.Random, count: int, reserved: set[str]) -> list[str]:
    """``count`` distinct pronounceable names, none equal to a reserved word."""
    names: list[str] = []
    seen = set(reserved)
    while len(names) < count:
        syllables = rng.choice([2, 2, 3])
        name = "".join(
            rng.choice(SYLLABLES_START) + rng.choice(SYLLABLES_VOWEL) for _ in range(syllables)
        ) + rng.choice(SYLLABLES_END)
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def format_chat(prompt: str, answer: str | None = None) -> str:
    """The chat text of one user turn, with the answer turn when given.

    Matches :data:`CHAT_TEMPLATE`, so that training text and
    ``tokenizer.apply_chat_template`` tokenize the same way.
    """
    text = f"{USER} {prompt} {ASSISTANT}"
    if answer is not None:
        text += f" {answer} {END}"
    return text


def train_tokenizer(texts: list[str]):
    """A word-level tokenizer of ``texts``, as a ``PreTrainedTokenizerFast``.

    Words split on whitespace and punctuation; every word of ``texts`` gets an
    id, the special tokens come first (``<pad>`` is 0).  The chat template of
    this module is attached, ``<|end|>`` is the end-of-sequence token.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    word_model = models.WordLevel(unk_token=UNK)
    tokenizer = Tokenizer(word_model)
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tokenizer.train_from_iterator(texts, trainer=trainer)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=END,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped
