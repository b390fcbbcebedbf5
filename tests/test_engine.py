"""The generation loop against Hugging Face generate() and a plain reference loop."""

import hashlib

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from conftest import BOS, EOS, PAD, PROMPTS, left_padded, tiny_gpt2, tiny_llama, tiny_qwen2
from proxytune import ExpertPair, PromptTemplate, ProxyTunedModel, SteeringPlan

FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "qwen2": tiny_qwen2}


def reference_loop(base, prompts, steering, max_new_tokens, templates=None):
    """Greedy proxy-tuning written for clarity: no cache, no padding, one row at a time.

    steering: per row, a list of (expert, anti_expert, alpha).  templates: per
    model (by id), a PromptTemplate.  Every model re-reads its whole sequence
    at every step.  Returns (tokens per row, fused logits per row and step).
    """
    templates = templates or {}

    def last_logits(model, sequence):
        template = templates.get(id(model))
        prompt, generated = sequence
        ids = (template.wrap(prompt) if template else prompt) + generated
        return model(torch.tensor([ids])).logits[0, -1].float()

    all_tokens, all_logits = [], []
    for prompt, pairs in zip(prompts, steering):
        generated, row_logits = [], []
        for _ in range(max_new_tokens):
            fused = last_logits(base, (prompt, generated))
            for expert, anti, alpha in pairs:
                offset = last_logits(expert, (prompt, generated))
                if anti is not None:
                    offset = offset - last_logits(anti, (prompt, generated))
                fused = fused + alpha * offset
            row_logits.append(fused)
            generated.append(int(torch.argmax(fused)))
        all_tokens.append(generated)
        all_logits.append(torch.stack(row_logits))
    return all_tokens, all_logits


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_no_expert_greedy_matches_hugging_face(family, batch):
    input_ids, attention_mask = batch
    base = FACTORIES[family](0)
    expected = base.generate(input_ids, attention_mask=attention_mask,
                             max_new_tokens=12, do_sample=False)
    got = ProxyTunedModel(base).generate(input_ids, attention_mask=attention_mask,
                                         max_new_tokens=12, do_sample=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_no_expert_seeded_sampling_matches_hugging_face(family, batch):
    input_ids, attention_mask = batch
    base = FACTORIES[family](0)
    settings = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=40,
                    top_p=0.9, repetition_penalty=1.3)
    torch.manual_seed(123)
    expected = base.generate(input_ids, attention_mask=attention_mask, **settings)
    torch.manual_seed(123)
    got = ProxyTunedModel(base).generate(input_ids, attention_mask=attention_mask, **settings)
    assert torch.equal(got, expected)


def mixed_model():
    base = tiny_llama(0)
    expert_a, anti_a = tiny_llama(1, layers=1), tiny_llama(2, layers=1)
    expert_b, anti_b = tiny_llama(3, layers=1), tiny_llama(4, layers=1)
    model = ProxyTunedModel(base, [ExpertPair("a", expert_a, anti_a, alpha=1.0),
                                   ExpertPair("b", expert_b, anti_b, alpha=0.5)])
    return model, {"a": (expert_a, anti_a), "b": (expert_b, anti_b)}


def test_mixed_batch_matches_reference_loop(batch):
    input_ids, attention_mask = batch
    model, pairs = mixed_model()
    choices, alphas = ["a", None, "b", "a"], [1.0, 0.0, 2.0, 0.7]

    out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8,
                         do_sample=False, expert=choices, alpha=alphas,
                         return_dict_in_generate=True, output_logits=True)

    steering = [[(*pairs[name], alpha)] if name else [] for name, alpha in zip(choices, alphas)]
    ref_tokens, ref_logits = reference_loop(model.base, PROMPTS, steering, 8)
    new_tokens = out.sequences[:, input_ids.shape[1]:]
    assert new_tokens.tolist() == ref_tokens
    got_logits = torch.stack(out.logits, dim=1)  # (B, steps, V)
    for row in range(len(PROMPTS)):
        torch.testing.assert_close(got_logits[row], ref_logits[row], atol=1e-4, rtol=1e-4)


def test_soft_plan_mixes_pairs_as_reference_loop(batch):
    input_ids, attention_mask = batch
    model, pairs = mixed_model()
    alpha = torch.tensor([[0.5, 0.5], [0.0, 0.0], [1.0, 0.0], [0.2, 1.5]])
    plan = SteeringPlan(["a", "b"], alpha)

    got = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6,
                         do_sample=False, steering=plan)

    steering = [[(*pairs[n], float(w)) for n, w in zip("ab", row) if w != 0] for row in alpha]
    ref_tokens, _ = reference_loop(model.base, PROMPTS, steering, 6)
    assert got[:, input_ids.shape[1]:].tolist() == ref_tokens


def test_templates_wrap_each_models_prompt(batch):
    input_ids, attention_mask = batch
    base, expert, anti = tiny_llama(0), tiny_llama(1, layers=1), tiny_llama(2, layers=1)
    expert_template = PromptTemplate([BOS, 90, 91], [92])
    anti_template = PromptTemplate([93], [])
    model = ProxyTunedModel(base, [ExpertPair("chat", expert, anti, 1.0,
                                              expert_template, anti_template)])

    got = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6,
                         do_sample=False, expert="chat")

    templates = {id(expert): expert_template, id(anti): anti_template}
    steering = [[(expert, anti, 1.0)]] * len(PROMPTS)
    ref_tokens, _ = reference_loop(base, PROMPTS, steering, 6, templates)
    assert got[:, input_ids.shape[1]:].tolist() == ref_tokens


def test_alpha_zero_and_identical_pair_give_the_base(batch):
    input_ids, attention_mask = batch
    base, expert = tiny_llama(0), tiny_llama(1)
    plain = base.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8,
                          do_sample=False)
    model = ProxyTunedModel(base, [ExpertPair("e", expert, tiny_llama(2)),
                                   ExpertPair("same", expert, expert)])

    zero_alpha = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8,
                                do_sample=False, expert="e", alpha=0.0)
    same_pair = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8,
                               do_sample=False, expert="same", alpha=3.0)
    assert torch.equal(zero_alpha, plain)
    assert torch.equal(same_pair, plain)


def exact_first_token_probs(model, prompt, pair_name, alpha):
    """softmax(base + alpha * (expert - anti)) at the end of ``prompt``."""
    pair = model.pairs[pair_name]
    ids = torch.tensor([prompt])
    fused = model.base(ids).logits[0, -1] + alpha * (
        pair.expert(ids).logits[0, -1] - pair.anti_expert(ids).logits[0, -1]
    )
    return torch.softmax(fused.double(), dim=-1)


@pytest.mark.parametrize("seeded", [False, True])
def test_sampling_draws_from_fused_distribution(seeded):
    model, _ = mixed_model()
    prompt, draws = [BOS, 5, 6], 6000
    input_ids = torch.tensor([prompt] * draws)
    seed = torch.arange(draws) if seeded else None
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=1, do_sample=True, top_k=0, expert="a",
                             alpha=2.0, seed=seed)
        probs = exact_first_token_probs(model, prompt, "a", 2.0)

    counts = torch.bincount(out[:, -1], minlength=probs.numel()).double()
    expected = probs * draws
    # Pearson's statistic over the tokens expected at least 5 times; the rest pooled.
    frequent = expected >= 5
    observed, expected = counts[frequent], expected[frequent]
    if not frequent.all():
        observed = torch.cat([observed, counts[~frequent].sum()[None]])
        expected = torch.cat([expected, (probs * draws)[~frequent].sum()[None]])
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    dof = observed.numel() - 1
    # Mean dof, sd sqrt(2 dof): 5 sd above the mean fails only by a broken sampler.
    assert chi2 < dof + 5 * (2 * dof) ** 0.5


def test_seeded_rows_do_not_depend_on_their_batch():
    model, _ = mixed_model()
    prompts = [[BOS, 5, 6], [BOS, 7, 8, 9], [BOS, 10]]
    input_ids, attention_mask = left_padded(prompts)
    settings = dict(max_new_tokens=6, do_sample=True, temperature=1.3, expert="a")
    together = model.generate(input_ids, attention_mask=attention_mask,
                              seed=[11, 12, 13], **settings)
    alone_ids, alone_mask = left_padded(prompts[1:2])
    alone = model.generate(alone_ids, attention_mask=alone_mask, seed=12, **settings)
    assert together[1, -6:].tolist() == alone[0, -6:].tolist()


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_base_weights_unchanged(batch):
    input_ids, attention_mask = batch
    model, _ = mixed_model()
    before = weights_digest(model.base)
    model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=5,
                   do_sample=True, expert="a")
    assert weights_digest(model.base) == before


def test_hugging_face_surface(batch):
    """num_return_sequences, min_new_tokens, eos lists, scores, processors and streamer."""
    input_ids, attention_mask = batch
    base = tiny_llama(0)
    model = ProxyTunedModel(base)

    class BanToken(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, 7] = float("-inf")
            return scores

    class Collect:
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value)

        def end(self):
            self.chunks.append("end")

    settings = dict(attention_mask=attention_mask, max_new_tokens=6, min_new_tokens=3,
                    do_sample=True, num_return_sequences=2, eos_token_id=[EOS, 9],
                    pad_token_id=PAD, return_dict_in_generate=True, output_scores=True,
                    output_logits=True,
                    logits_processor=LogitsProcessorList([BanToken()]))
    torch.manual_seed(5)
    expected = base.generate(input_ids, **settings)
    torch.manual_seed(5)
    streamer = Collect()
    got = model.generate(input_ids, streamer=streamer, **settings)

    assert torch.equal(got.sequences, expected.sequences)
    for ours, theirs in zip(got.scores, expected.scores):
        torch.testing.assert_close(ours, theirs)
    for ours, theirs in zip(got.logits, expected.logits):
        torch.testing.assert_close(ours, theirs)
    assert streamer.chunks[-1] == "end"
    assert len(streamer.chunks) == 1 + len(got.scores) + 1


def test_stop_strings_match_hugging_face():
    words = ["<pad>", "<s>", "</s>", "abcdef"] + [f"w{i}" for i in range(97)]
    tokenizer = word_tokenizer(words)
    base = tiny_llama(0)
    input_ids, attention_mask = left_padded(PROMPTS)
    plain = base.generate(input_ids, attention_mask=attention_mask, max_new_tokens=10,
                          do_sample=False)
    stop_word = tokenizer.decode(plain[0, input_ids.shape[1] + 3])
    settings = dict(attention_mask=attention_mask, max_new_tokens=10, do_sample=False,
                    stop_strings=[stop_word], tokenizer=tokenizer, pad_token_id=PAD)

    expected = base.generate(input_ids, **settings)
    got = ProxyTunedModel(base).generate(input_ids, **settings)
    assert torch.equal(got, expected)
    assert (got[0, input_ids.shape[1] + 4:] == PAD).all()  # row 0 stopped at its word


def test_custom_generate_hook(batch):
    input_ids, attention_mask = batch
    base, expert, anti = tiny_llama(0), tiny_llama(1), tiny_llama(2)
    model = ProxyTunedModel(base, [ExpertPair("e", expert, anti)])

    via_model = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=7,
                               do_sample=False, expert="e")
    via_base = base.generate(input_ids, attention_mask=attention_mask, max_new_tokens=7,
                             do_sample=False,
                             custom_generate=model.decoding_method(expert="e"))
    assert torch.equal(via_model, via_base)


def test_padded_vocabulary_is_masked(batch):
    """A base whose output layer is padded past the tokenizer never emits the padding."""
    input_ids, attention_mask = batch
    base = tiny_llama(0, vocab_size=128)
    with torch.no_grad():
        base.lm_head.weight[101:] = base.lm_head.weight[101:] * 0 + 5.0  # pads win
    expert = tiny_llama(1, vocab_size=101)

    class Tokenizer:  # only its length matters here
        def __len__(self):
            return 101

    model = ProxyTunedModel(base, [ExpertPair("e", expert, tiny_llama(2))], Tokenizer())
    got = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=5,
                         do_sample=False, expert=["e", None, "e", None])
    assert got[:, input_ids.shape[1]:].max() < 101


def word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(words)}
    inner = Tokenizer(models.WordLevel(vocab, unk_token=words[0]))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=inner, unk_token=words[0])


def test_mismatched_tokenizers_are_refused():
    words = ["<unk>", "the", "cat", "sat", "on", "mat"]
    swapped = ["<unk>", "the", "cat", "on", "sat", "mat"]
    model = ProxyTunedModel(tiny_llama(0), tokenizer=word_tokenizer(words))
    with pytest.raises(ValueError, match="token id 3"):
        model.add_pair(ExpertPair("e", tiny_llama(1), tiny_llama(2)),
                       tokenizer=word_tokenizer(swapped))


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=-1.0, do_sample=True), "temperature"),
    (dict(top_p=1.5, do_sample=True), "top_p"),
    (dict(top_p=0.0, do_sample=True), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(expert="nope"), "nope"),
    (dict(not_a_generate_argument=3), "not_a_generate_argument"),
])
def test_bad_settings_are_refused(batch, settings, message):
    input_ids, attention_mask = batch
    model, _ = mixed_model()
    settings = {"max_new_tokens": 3, **settings}
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids, attention_mask=attention_mask, **settings)


def test_empty_prompts_are_refused():
    model, _ = mixed_model()
    with pytest.raises(ValueError, match="empty"):
        model.generate(torch.zeros((2, 0), dtype=torch.long), max_new_tokens=3)
    input_ids, attention_mask = left_padded([[BOS, 4], [PAD]])
    attention_mask[1] = 0
    with pytest.raises(ValueError, match=r"Rows \[1\]"):
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=3)


def test_nan_logits_are_reported_with_the_model(batch):
    input_ids, attention_mask = batch
    model, _ = mixed_model()
    broken_expert = tiny_llama(7, layers=1)
    with torch.no_grad():
        broken_expert.lm_head.weight.fill_(float("nan"))
    model.add_pair(ExpertPair("broken", broken_expert, tiny_llama(8, layers=1)))
    with pytest.raises(FloatingPointError, match="broken.expert"):
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=3,
                       expert="broken")
