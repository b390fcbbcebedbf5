"""The real-model example end to end, on a tiny stand-in model and a handful of questions.

The full run (SmolLM2-135M-Instruct, every capital question) is the documented
command ``python examples/real_model/run_all.py``; here every step of it runs
on quiz, fortune and WordNet files written in their real formats, with a
randomly initialised three-layer Llama and its own small byte-level tokenizer.
"""

import copy
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples" / "real_model"
sys.path.insert(0, str(EXAMPLE_DIR))

import quiz_data as example_data  # noqa: E402
import quiz_eval as example_evaluate  # noqa: E402
import run_all  # noqa: E402
from quiz import (  # noqa: E402
    QuizItem, capital_items, expand_pattern, mentions_any, other_quiz_items, split_fields)
from pair_training import (  # noqa: E402
    IGNORE, answer_only_loss, distillation_loss, through_base_loss, truncated_copy)

from proxytune import PromptTemplate  # noqa: E402
from proxytune.loading import load_local  # noqa: E402

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QUIZ_FILES = {  # the real files' syntax: {optional}, a|b, [group], overstruck accents
    "africa": "Cameroon:Yaound['\be|e\b'|e]\n{The }Gambia:Banjul|Bathurst\nEgypt:Cairo\n"
              "Central Africa{n Rep{ublic}}:Bangui\n",
    "europe": "Austria:Vienna|Wien\nFrance:Paris\nArmenia:Yerevan\nNorway:Oslo\n",
    "asia": "Armenia:Yerevan\nJapan:Tokyo\nNepal:Kathmandu\n",
    "america": "Cuba:Ha[v|b]ana\nPeru:Lima\n",
    "province": "Ontario:Toronto\n",
    "state": "Alabama|Ala|AL:Montgomery:AL:goldenrod\nOhio|OH:Columbus:OH:{scarlet }carnation\n",
    "pres": "{G{eorge} }Washington:1789-{17}97:{J{ohn} }Adams:{J{ohn} }Adams\n"
            "{J{ohn} }Adams:1797-1801:{T{homas} }Jefferson:{T{homas} }Jefferson\n",
    "sexes": "abbot:abbess\n",
}
FORTUNES = "A fortune a day.\n%\nBrevity is the soul of wit.\n\t\t-- Shakespeare\n%\n"
WORDNET_NOUN = (
    "  1 This software and database is being provided\n"
    "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived to exist\n"
    "08932568 15 n 01 Paris 0 001 | the capital and largest city of France\n"
)


def write_fake_debian_root(root: Path) -> None:
    """The three packages' files, laid out where ``dpkg -x`` puts them."""
    quiz_dir = root / example_data.QUIZ_SUBDIR
    quiz_dir.mkdir(parents=True)
    for name, text in QUIZ_FILES.items():
        (quiz_dir / name).write_text(text, encoding="utf-8")
    fortune_dir = root / example_data.FORTUNE_SUBDIR
    fortune_dir.mkdir(parents=True)
    (fortune_dir / "wit").write_text(FORTUNES)
    (fortune_dir / "wit.dat").write_bytes(b"\x00\x01")
    wordnet_dir = root / example_data.WORDNET_SUBDIR
    wordnet_dir.mkdir(parents=True)
    for part in example_data.WORDNET_PARTS:
        (wordnet_dir / f"data.{part}").write_text(WORDNET_NOUN if part == "noun" else "")


def build_stand_in(folder: Path, texts: list[str]) -> None:
    """A byte-level BPE tokenizer with a chat template and a tiny random Llama."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|im_end|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(work dir, data counts, stand-in model folder)."""
    work_dir = tmp_path_factory.mktemp("real_model_work")
    write_fake_debian_root(work_dir / "debian_root")
    counts = example_data.prepare_data(work_dir, max_prose_documents=10)
    stand_in = work_dir / "stand_in"
    texts = [line for name in QUIZ_FILES for line in QUIZ_FILES[name].splitlines()]
    texts += ["What is the capital of the US state of", FORTUNES]
    build_stand_in(stand_in, texts)
    return work_dir, counts, stand_in


@pytest.mark.parametrize("pattern, expected", [
    ("Central Africa{n Rep{ublic}}",
     ["Central African Republic", "Central African Rep", "Central Africa"]),
    ("Yaound['\be|e\b'|e]", ["Yaoundé", "Yaounde"]),
    ("Bogot['a|a'|a]", ["Bogotá", "Bogota"]),
    ("Banjul|Bathurst", ["Banjul", "Bathurst"]),
    ("Port[-| ]au[-| ]Prince",
     ["Port-au-Prince", "Port-au Prince", "Port au-Prince", "Port au Prince"]),
    ("K[o|o\b/|/\bo]benhavn", ["Kobenhavn", "København"]),
    ("{The }Gambia", ["The Gambia", "Gambia"]),
    (r"AT\&T", ["AT&T"]),
])
def test_quiz_patterns_expand_to_every_accepted_spelling(pattern, expected):
    assert expand_pattern(pattern) == expected


def test_fields_split_only_outside_groups():
    assert split_fields("Ohio|OH:Columbus:OH:{scarlet: }carnation") == [
        "Ohio|OH", "Columbus", "OH", "{scarlet: }carnation"]


def test_exact_match_reads_the_first_line_against_every_spelling():
    item = QuizItem("What is the capital of Cameroon?", "Yaoundé", ["Yaoundé", "Yaounde"])
    assert item.is_correct("Yaounde.\nQ: next question")
    assert item.is_correct("  YAOUNDÉ")
    assert not item.is_correct("The capital of Cameroon is Yaoundé.")
    assert not item.is_correct("")
    assert item.is_mentioned("The capital of Cameroon is Yaoundé.")
    assert not item.is_mentioned("The capital of Cameroon is Yaoundeville.")


def test_other_quizzes_give_short_answers_and_held_out_capitals_are_left_out(prepared):
    work_dir = prepared[0]
    items = other_quiz_items(work_dir / "debian_root" / example_data.QUIZ_SUBDIR)
    by_question = {item.question: item.answer for item in items}
    assert by_question["What is the postal abbreviation of the US state of Ohio?"] == "OH"
    assert by_question["What is the state flower of Ohio?"] == "scarlet carnation"
    assert by_question["Which US president came after George Washington?"] == "John Adams"
    assert by_question["What is the female counterpart of a abbot?"] == "abbess"
    saved = example_data.load_items(work_dir / "data" / "other_quizzes.jsonl")
    assert [item.question for item in saved] == [item.question for item in items]

    held_out = [QuizItem("What is the capital of the US state of Ohio?", "Columbus",
                         ["Columbus"]),
                QuizItem("What is the capital of Cuba?", "Havana", ["Havana", "Habana"])]
    kept = [item.question for item in items if not mentions_any(item, held_out)]
    assert "What is the state flower of Ohio?" not in kept  # names a held-out place
    assert "What is the state flower of Alabama?" in kept
    assert not mentions_any(QuizItem("Who founded Columbusville?", "x", ["x"]), held_out)
    assert mentions_any(QuizItem("Where is it?", "habana", ["habana"]), held_out)


def test_prepared_data_merges_duplicates_and_drops_capital_prose(prepared):
    work_dir, counts, _ = prepared
    items = capital_items(work_dir / "debian_root" / example_data.QUIZ_SUBDIR)
    questions = [item.question for item in items]
    assert questions.count("What is the capital of Armenia?") == 1
    assert "What is the capital of the US state of Alabama?" in questions
    assert "What is the capital of Central African Republic?" in questions
    assert counts["train"] + counts["test"] == counts["questions"] == len(items)

    prose = [row["text"] for row in example_data.read_jsonl(work_dir / "data" / "prose.jsonl")]
    assert "entity: that which is perceived to exist" in prose
    assert "Brevity is the soul of wit.\n\t\t-- Shakespeare" in prose
    assert not any("capital" in text for text in prose)


def test_truncated_copy_equals_the_base_first_layers_then_norm_and_head(prepared):
    base, tokenizer = load_local(prepared[2])
    small = truncated_copy(base, 2)
    input_ids = torch.tensor([tokenizer.encode("What is the capital of Peru?")])
    with torch.no_grad():
        hidden = base(input_ids, output_hidden_states=True).hidden_states[2]
        expected = base.lm_head(base.model.norm(hidden))
        got = small(input_ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert small.model.embed_tokens.weight.data_ptr() != base.model.embed_tokens.weight.data_ptr()


def test_truncated_copy_with_last_layers_runs_the_chosen_layers_in_order(prepared):
    base, tokenizer = load_local(prepared[2])
    small = truncated_copy(base, 2, last_layers=1)  # the base's layers 0 and 2 of 3
    input_ids = torch.tensor([tokenizer.encode("What is the capital of Peru?")])
    layer_by_layer = copy.deepcopy(base)
    layer_by_layer.model.layers = torch.nn.ModuleList(
        [layer_by_layer.model.layers[0], layer_by_layer.model.layers[2]])
    layer_by_layer.config.num_hidden_layers = 2
    for index, layer in enumerate(layer_by_layer.model.layers):
        layer.self_attn.layer_idx = index
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids).logits, layer_by_layer(input_ids).logits,
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        truncated_copy(base, 2, last_layers=3)


def test_distillation_loss_is_zero_against_itself_and_positive_otherwise(prepared):
    model, _ = load_local(prepared[2])
    other = truncated_copy(model, 2)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 7))
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    with torch.no_grad():
        assert distillation_loss(model, model, input_ids, attention_mask, labels).item() \
            == pytest.approx(0.0, abs=1e-5)
        assert distillation_loss(other, model, input_ids, attention_mask, labels).item() > 0


def test_answer_only_loss_equals_the_full_loss_on_the_same_labels(prepared):
    model, _ = load_local(prepared[2])
    torch.manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 6:] = 0
    labels = input_ids.clone()
    labels[:, :4] = IGNORE
    labels[attention_mask == 0] = IGNORE
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask, labels=labels).loss
        got = answer_only_loss(model, input_ids, attention_mask, labels)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def proxy_greedy_reference(base, expert, anti_expert, prompt_ids, alpha, max_new_tokens, eos):
    """Plain loop, no cache: argmax of base + alpha * (expert - anti) at each step."""
    ids = list(prompt_ids)
    new = []
    for _ in range(max_new_tokens):
        tensor = torch.tensor([ids])
        with torch.no_grad():
            fused = base(tensor).logits[0, -1] + alpha * (
                expert(tensor).logits[0, -1] - anti_expert(tensor).logits[0, -1])
        token = int(fused.argmax())
        new.append(token)
        ids.append(token)
        if token == eos:
            break
    return new


def frozen_stand_in_and_split(prepared):
    """(frozen stand-in base, its tokenizer, training items, test items)."""
    work_dir, _, stand_in = prepared
    base, tokenizer = load_local(stand_in)
    base.requires_grad_(False)
    data_dir = work_dir / "data"
    return (base, tokenizer, example_data.load_items(data_dir / "capitals_train.jsonl"),
            example_data.load_items(data_dir / "capitals_test.jsonl"))


def test_whole_pipeline_on_a_stand_in_model(prepared, tmp_path):
    base, tokenizer, train_items, test_items = frozen_stand_in_and_split(prepared)
    data_dir = prepared[0] / "data"
    prose = [row["text"] for row in example_data.read_jsonl(data_dir / "prose.jsonl")]
    settings = run_all.Settings(
        anti_layers=2, anti_last_layers=1, distill_items=6, prose_token_budget=400,
        prose_max_tokens=32, expert_epochs=3, direct_epochs=2, batch_size=4, shots=2,
        validation_questions=2, alphas="0.5,1.0", eval_batch_size=3, max_new_tokens=4,
    )
    results_dir = tmp_path / "results"
    other_items = example_data.load_items(data_dir / "other_quizzes.jsonl")
    report = run_all.run_pipeline(base, tokenizer, train_items, test_items, prose, settings,
                                  tmp_path / "work", results_dir, run_all.Timer(),
                                  other_items=other_items)

    assert report["base_weights_sha256"]["unchanged"]
    held_out = train_items[-settings.validation_questions:] + test_items
    expected_extra = [item for item in other_items if not mentions_any(item, held_out)]
    assert 0 < report["extra_training_items"] == len(expected_extra)
    assert run_all.weights_digest(base) == report["base_weights_sha256"]["before"]
    for role in ("anti_expert", "expert", "direct_tuned"):
        assert (tmp_path / "work" / "models" / role / "config.json").is_file()
    assert (results_dir / "exact_match.png").stat().st_size > 0
    table = (results_dir / "results.md").read_text()
    assert "proxy-tuned base" in table and "Share of the base-to-direct-tuning gap" in table

    # Scores recomputed from the saved answers.
    rows = [json.loads(line) for line in (results_dir / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == len(test_items)
    for name, em in report["summary"]["exact_match"].items():
        recomputed = sum(
            QuizItem(row["question"], "", row["accepted"]).is_correct(row[name]["answer"])
            for row in rows
        ) / len(rows)
        assert em == pytest.approx(recomputed)

    # The proxy setting is the validation grid's best, and its test answers equal a
    # plain greedy loop over the trained models with that prompt and alpha.
    selection = report["proxy_selection_on_validation"]
    best_score = max(row["validation_exact_match"] for row in selection["grid"])
    chosen = selection["chosen"]
    assert {"prompt": chosen["prompt"], "alpha": chosen["alpha"],
            "validation_exact_match": best_score} in selection["grid"]
    anti, _ = load_local(tmp_path / "work" / "models" / "anti_expert")
    expert, _ = load_local(tmp_path / "work" / "models" / "expert")
    template = PromptTemplate.from_chat_template(tokenizer)
    fit_items = train_items[: len(train_items) - settings.validation_questions]
    prompts = example_evaluate.build_prompts(chosen["prompt"], tokenizer, template, test_items,
                                             fit_items[: settings.shots])
    for row, prompt in zip(rows, prompts):
        tokens = proxy_greedy_reference(base, expert, anti, prompt, chosen["alpha"],
                                        settings.max_new_tokens, tokenizer.eos_token_id)
        assert row["proxy_tuned"]["answer"] == tokenizer.decode(tokens, skip_special_tokens=True)


def test_share_of_gap_closed():
    assert example_evaluate.share_of_gap_closed(0.2, 0.5, 0.8) == pytest.approx(0.5)
    assert example_evaluate.share_of_gap_closed(0.4, 0.5, 0.4) is None


def test_through_base_loss_starts_at_the_base_loss_and_trains_only_the_expert(prepared):
    base, _ = load_local(prepared[2])
    base.requires_grad_(False)
    anti = truncated_copy(base, 2)
    anti.requires_grad_(False)
    expert = copy.deepcopy(anti).requires_grad_(True)
    torch.manual_seed(2)
    input_ids = torch.randint(0, base.config.vocab_size, (2, 8))
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, :5] = IGNORE

    loss = through_base_loss(expert, anti, base, 1.0, input_ids, attention_mask, labels)
    with torch.no_grad():  # expert == anti-expert: the steered base is the base
        expected = answer_only_loss(base, input_ids, attention_mask, labels)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)

    loss.backward()
    assert all(p.grad is None for p in list(base.parameters()) + list(anti.parameters()))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in expert.parameters())


def test_validation_only_run_with_an_expert_tuned_through_the_base(prepared, tmp_path):
    base, tokenizer, train_items, test_items = frozen_stand_in_and_split(prepared)
    settings = run_all.Settings(
        anti_layers=2, anti_last_layers=1, distill_items=4, prose_token_budget=200,
        prose_max_tokens=32, expert_epochs=2, batch_size=4, shots=2, validation_questions=2,
        alphas="1.0", eval_batch_size=3, max_new_tokens=3, expert_objective="through_base",
    )
    digest = run_all.weights_digest(base)
    report = run_all.run_pipeline(base, tokenizer, train_items, test_items, [], settings,
                                  tmp_path / "work", tmp_path / "results", run_all.Timer(),
                                  validation_only=True)

    assert run_all.weights_digest(base) == digest
    assert report["training"]["expert"]["recipe"]["expert_objective"] == "through_base"
    assert len(report["validation"]["grid"]) == 2  # chat and few-shot at alpha 1
    assert not (tmp_path / "work" / "models" / "direct_tuned").exists()

    with pytest.raises(ValueError, match="expert_objective"):
        run_all.run_pipeline(base, tokenizer, train_items, test_items, [],
                             dataclasses.replace(settings, expert_objective="joint"),
                             tmp_path / "work", tmp_path / "results", run_all.Timer(),
                             validation_only=True)
