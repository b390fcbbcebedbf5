"""The synthetic world: seeded determinism, splits that never leak, chat format."""

import pytest

from proxytune.experiments.world import (
    ASSISTANT,
    ATTRIBUTES,
    CHOICES,
    DOMAINS,
    END,
    QUESTIONS,
    USER,
    format_chat,
    generate_world,
    train_tokenizer,
)


def world_texts(world):
    """Every text the world produces, in order, as one list of strings."""
    texts = list(world.pretraining_documents())
    for domain in DOMAINS:
        for split in ("finetune", "heldout"):
            texts += [repr(e) for e in world.chat_examples(domain, split)]
    texts += [repr(p) for p in world.knowledge_probes()]
    return texts


def test_same_seed_gives_the_same_world_text_for_text():
    first, second = generate_world(seed=3, n_people=40), generate_world(seed=3, n_people=40)

    assert first.facts == second.facts
    assert first.finetune_people == second.finetune_people
    assert world_texts(first) == world_texts(second)


def test_another_seed_gives_another_world():
    first, second = generate_world(seed=3, n_people=40), generate_world(seed=4, n_people=40)

    assert first.people != second.people
    assert world_texts(first) != world_texts(second)


def test_every_fact_is_stated_in_the_corpus():
    world = generate_world(seed=1, n_people=24)
    corpus = "\n".join(world.pretraining_documents())

    for person in world.people:
        for attribute in ATTRIBUTES:
            value = world.facts[person][attribute]
            question = QUESTIONS[attribute].format(p=person)
            assert f"question : {question} answer : {value} ." in corpus


def test_corpus_asks_every_fact_in_chat_but_never_answers_tersely():
    world = generate_world(seed=1, n_people=24)
    documents = world.pretraining_documents()
    chats = [d for d in documents if d.startswith(USER)]

    for person in world.people:
        for attribute in ATTRIBUTES:
            question = QUESTIONS[attribute].format(p=person)
            assert any(d.startswith(f"{USER} {question} {ASSISTANT}") for d in chats)
    for document in chats:
        reply = document.split(ASSISTANT, 1)[1].removesuffix(END).split()
        assert len(reply) > 2, f"a terse reply in the corpus: {document!r}"


def test_finetuning_data_never_mentions_heldout_people():
    world = generate_world(seed=2, n_people=50)
    heldout = set(world.heldout_people)
    assert heldout, "the world must hold some people out"

    for domain in DOMAINS:
        for example in world.chat_examples(domain, "finetune"):
            words = set(example.prompt.split()) | {example.answer}
            assert not words & heldout, f"{domain} fine-tuning mentions {words & heldout}"
    for probe in world.knowledge_probes():
        assert probe.person in heldout


def test_chat_answers_follow_the_facts():
    world = generate_world(seed=5, n_people=30)

    for example in world.chat_examples("qa", "heldout"):
        assert example.answer == world.facts[example.person][example.attribute]
        assert example.prompt == QUESTIONS[example.attribute].format(p=example.person)
    for example in world.chat_examples("choice", "finetune"):
        true_value = world.facts[example.person][example.attribute]
        assert example.answer == true_value
        offered = [
            CHOICES[example.attribute].format(p=example.person, a=a, b=b)
            for a in world.values(example.attribute)
            for b in world.values(example.attribute)
            if true_value in (a, b) and a != b
        ]
        assert example.prompt in offered


def test_validation_and_test_split_the_heldout_prompts():
    world = generate_world(seed=2, n_people=50, validation_share=0.25)
    validation = set(world.validation_people)
    assert validation < set(world.heldout_people)
    assert len(validation) == round(0.25 * len(world.heldout_people))

    for domain in DOMAINS:
        heldout = world.chat_examples(domain, "heldout")
        chosen = world.chat_examples(domain, "validation")
        test = world.chat_examples(domain, "test")
        assert {e.person for e in chosen} == validation
        assert not {e.person for e in test} & validation
        assert sorted(map(repr, chosen + test)) == sorted(map(repr, heldout))
    # The split leaves the facts and the other splits as they were.
    assert generate_world(seed=2, n_people=50, validation_share=0.0).facts == world.facts


def test_small_model_corpus_states_only_its_peoples_facts():
    world = generate_world(seed=2, n_people=50)
    chosen = world.small_model_people(heldout_share=0.25)
    tuned = {p for people in world.finetune_people.values() for p in people}
    assert tuned <= set(chosen)
    assert len(set(chosen) & set(world.heldout_people)) == round(0.25 * len(world.heldout_people))

    full = world.pretraining_documents()
    small = world.pretraining_documents(people=chosen)
    left_out = set(world.people) - set(chosen)
    for person in left_out:
        about = [d for d in small if person in d.split()]
        # Named in passing, but no fact of theirs is stated.
        assert about
        for value in world.facts[person].values():
            assert not any(value in d.split() for d in about)
    # The chosen people's documents are the full corpus's, text for text.
    kept = [d for d in full if not left_out & set(d.split())]
    assert sorted(kept) == sorted(d for d in small if not left_out & set(d.split()))

    with pytest.raises(ValueError, match="not in this world"):
        world.pretraining_documents(people=["nobody"])


def test_tokenizer_round_trips_chat_and_knows_every_word():
    world = generate_world(seed=0, n_people=20)
    documents = world.pretraining_documents()
    examples = [e for d in DOMAINS for e in world.chat_examples(d, "heldout")]
    tokenizer = train_tokenizer(documents + [format_chat(e.prompt, e.answer) for e in examples])

    example = examples[0]
    text = format_chat(example.prompt, example.answer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert ids[-1] == tokenizer.eos_token_id

    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": example.prompt}], tokenize=False,
        add_generation_prompt=True,
    )
    assert templated == format_chat(example.prompt)


def test_bad_settings_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="held-out"):
        generate_world(seed=0, n_people=40, finetune_share=0.6)
    world = generate_world(seed=0, n_people=20)
    with pytest.raises(ValueError, match="domain"):
        world.chat_examples("poetry", "finetune")
    with pytest.raises(ValueError, match="split"):
        world.chat_examples("qa", "train")
