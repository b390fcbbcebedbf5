"""A short run of the alignment experiment writes every table column and file."""

import json

import pytest

import torch

from proxytune.experiments.alignment import (
    choose_alphas,
    exact_match,
    generate_replies,
    load_cluster_router,
    next_token_logits,
    run_alignment,
)
from proxytune.loading.embedded import EMBEDDED_DIR, load_embedded_family
from proxytune.experiments.world import DOMAINS, EMBEDDED_WORLD, generate_world

needs_family = pytest.mark.skipif(
    not (EMBEDDED_DIR / "hashes.json").is_file(),
    reason="the embedded family is not built (python examples/build_family.py)",
)

TASK_COLUMNS = ["domain", "base", "expert", "proxy-tuned base", "directly tuned base",
                "gap closed", "knowledge: base", "knowledge: direct", "knowledge: proxy"]
ROUTING_ROWS = ["no steering", *[f"{d} expert for all" for d in DOMAINS], "cluster router",
                "difficulty router", "oracle"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("alignment")
    markdown = run_alignment(out_dir, n_prompts=4, seed=1, show_progress=False)
    return out_dir, markdown


@needs_family
def test_short_run_writes_the_table_with_all_its_columns(short_run):
    out_dir, markdown = short_run
    assert (out_dir / "results.md").read_text() == markdown

    header = next(line for line in markdown.splitlines() if line.startswith("| domain"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == TASK_COLUMNS
    for domain in DOMAINS:
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {domain} |"))
        assert len(row.strip("|").split("|")) == len(TASK_COLUMNS)
    for setting in ROUTING_ROWS:
        assert f"| {setting} |" in markdown


@needs_family
def test_short_run_writes_json_and_plots(short_run):
    out_dir, _ = short_run
    results = json.loads((out_dir / "results.json").read_text())

    for domain in DOMAINS:
        scores = results["domains"][domain]
        assert scores["n_prompts"] == 4
        for key in ("base", "expert", "proxy", "direct"):
            assert 0.0 <= scores[key] <= 1.0
        gap = scores["direct"] - scores["base"]
        if gap:
            assert scores["gap_closed"] == pytest.approx((scores["proxy"] - scores["base"]) / gap)
        ranked = results["knowledge"][domain]["ranked"]
        assert set(ranked) == {f"{form} {name}" for form in ("text", "chat")
                               for name in ("base", "direct", "proxy")}
        assert all(0.0 <= value <= 1.0 for value in ranked.values())
    assert results["routing"]["n_prompts"] == 4 * len(DOMAINS)
    assert set(results["routing"]["scores"]) == set(ROUTING_ROWS)
    for name in ("task_scores.png", "knowledge.png", "routing.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_family
def test_same_seed_repeats_the_numbers(short_run, tmp_path):
    out_dir, _ = short_run
    again = run_alignment(tmp_path, n_prompts=4, seed=1, show_progress=False)
    assert again == (out_dir / "results.md").read_text()


@needs_family
def test_the_shipped_router_steers_with_the_runs_alpha():
    family = load_embedded_family(alpha=0.25)
    router = load_cluster_router(family, generate_world(**EMBEDDED_WORLD), seed=0)

    assert router.pair_alpha.tolist() == [0.25] * len(router.pair_names)


@needs_family
@torch.no_grad()
def test_next_token_logits_ignore_left_padding():
    family = load_embedded_family()
    texts = ["kelvor lives in", "the favorite color of a small boat is"]
    batched = next_token_logits(family.base, family.tokenizer, texts, batch_size=2)

    for row, text in enumerate(texts):
        ids = family.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        alone = family.base(input_ids=ids).logits[0, -1]
        torch.testing.assert_close(batched[row], alone, atol=1e-4, rtol=1e-4)


def test_replies_stop_at_the_end_token_and_score_exactly():
    class WordTokenizer:
        eos_token_id = 9
        words = {5: "brommel", 6: "dask", 7: "."}

        def __call__(self, texts, **kwargs):
            import torch

            return {"input_ids": torch.ones(len(texts), 2, dtype=torch.long),
                    "attention_mask": torch.ones(len(texts), 2, dtype=torch.long)}

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(self.words[i] for i in ids)

    def fake_generate(input_ids, attention_mask, rows, max_new_tokens):
        import torch

        new = torch.tensor([[5, 9, 6], [5, 7, 6]])[: input_ids.shape[0]]
        return torch.cat([input_ids, new], dim=1)

    replies = generate_replies(fake_generate, WordTokenizer(), ["a", "b"], 3,
                               show_progress=False)
    assert replies == ["brommel", "brommel . dask"]
    assert exact_match(replies, ["brommel", "brommel"]) == [1.0, 0.0]


@needs_family
def test_alpha_is_chosen_as_the_best_validation_score():
    family = load_embedded_family()
    chosen = choose_alphas(family, generate_world(**EMBEDDED_WORLD), candidates=(0.0, 1.0))

    for domain in DOMAINS:
        scores = chosen[domain]["scores"]
        assert set(scores) == {0.0, 1.0}
        # alpha 0 is the base alone, which never stops after the bare answer.
        assert scores[0.0] == 0.0
        assert chosen[domain]["alpha"] == max(scores, key=lambda a: (scores[a], -a))
