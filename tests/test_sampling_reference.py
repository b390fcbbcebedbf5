"""The PyTorch sampling path against Hugging Face's warpers and plain loops."""

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from proxytune.sampling import reference
from proxytune.sampling.params import SamplingParams, SteeringOffset


def _offset(batch, rows, width, generator, anti=True, alpha=0.7):
    """A pair routed to ``rows`` (ascending), packed, with uniform alpha."""
    row_map = torch.full((batch,), -1, dtype=torch.int32)
    row_map[rows] = torch.arange(len(rows), dtype=torch.int32)
    expert = torch.randn(len(rows), width, generator=generator)
    anti_logits = torch.randn(len(rows), width, generator=generator) if anti else None
    return SteeringOffset(expert, anti_logits, row_map, torch.full((batch,), alpha))


def test_fused_logits_match_a_plain_loop():
    generator = torch.Generator().manual_seed(0)
    batch, vocab = 3, 111
    base = torch.randn(batch, vocab + 4, generator=generator)
    offsets = [_offset(batch, [0, 2], vocab + 9, generator),
               _offset(batch, [2], vocab, generator, anti=False, alpha=-0.5)]

    fused = reference.fused_logits(base, vocab, offsets)

    expected = base[:, :vocab].clone()
    for offset in offsets:
        for row in range(batch):
            packed = int(offset.row_map[row])
            if packed < 0:
                continue
            delta = offset.expert_logits[packed, :vocab].clone()
            if offset.anti_logits is not None:
                delta -= offset.anti_logits[packed, :vocab]
            expected[row] += offset.alpha[row] * delta
    torch.testing.assert_close(fused, expected)


@pytest.mark.parametrize("temperature, top_k, top_p, min_p, penalty", [
    (1.0, 0, 1.0, 0.0, 1.3),   # penalty only
    (0.7, 10, 1.0, 0.0, 1.0),  # top-k
    (1.3, 0, 0.8, 0.0, 1.0),   # top-p
    (1.0, 0, 1.0, 0.1, 1.0),   # min-p
    (0.9, 40, 0.9, 0.02, 1.2),  # all of them, in Hugging Face's order
])
def test_scores_match_hugging_face_warpers(temperature, top_k, top_p, min_p, penalty):
    generator = torch.Generator().manual_seed(1)
    batch, vocab = 3, 111
    base = torch.randn(batch, vocab, generator=generator) * 2
    prev = torch.randint(0, vocab, (batch, 6), generator=generator)
    params = SamplingParams(do_sample=True, temperature=temperature, top_k=top_k,
                            top_p=top_p, min_p=min_p, repetition_penalty=penalty)

    _, _, scores = reference.steer_and_select(
        base, vocab, [], params, torch.zeros(batch, dtype=torch.long), prev,
        return_scores=True)

    expected = RepetitionPenaltyLogitsProcessor(penalty)(prev, base.clone())
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    warpers += [MinPLogitsWarper(min_p)] if min_p > 0 else []
    for warper in warpers:
        expected = warper(prev, expected)
    assert torch.equal(torch.isinf(scores), torch.isinf(expected))
    kept = ~torch.isinf(expected)
    torch.testing.assert_close(scores[kept], expected[kept], atol=1e-5, rtol=1e-5)


def test_top_k_keeps_ties_and_greedy_takes_lowest_id():
    base = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 0.0]])
    positions = torch.zeros(1, dtype=torch.long)
    params = SamplingParams(do_sample=True, top_k=3)
    _, _, scores = reference.steer_and_select(base, 6, [], params, positions, None,
                                              return_scores=True)
    assert torch.isinf(scores).tolist() == [[True, False, False, False, False, True]]
    tokens, _, _ = reference.steer_and_select(base, 6, [], SamplingParams(), positions, None)
    assert tokens.tolist() == [1]


def test_draws_follow_the_filtered_distribution():
    generator = torch.Generator().manual_seed(2)
    vocab, draws = 12, 40_000
    logits = torch.randn(1, vocab, generator=generator).expand(draws, vocab)
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=8, top_p=0.9,
                            seed=torch.arange(draws) * 7919)
    tokens, _, scores = reference.steer_and_select(
        logits, vocab, [], params, torch.full((draws,), 5), None, return_scores=True)

    expected = torch.softmax(scores[0], dim=0)
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[expected == 0].sum() == 0, "a filtered token was drawn"
    kept = expected > 0
    chi_square = ((counts[kept] - draws * expected[kept]) ** 2 / (draws * expected[kept])).sum()
    # 99.99th percentile of chi-square with at most 7 degrees of freedom is about 29.9
    assert chi_square < 30.0, f"chi-square {chi_square:.1f} over {int(kept.sum())} tokens"


def test_a_rows_draw_ignores_its_neighbours():
    generator = torch.Generator().manual_seed(3)
    vocab = 50
    logits = torch.randn(4, vocab, generator=generator)
    params = SamplingParams(do_sample=True, top_p=0.95, seed=torch.tensor([11, 12, 13, 14]))
    positions = torch.tensor([3, 9, 4, 1])
    together, _, _ = reference.steer_and_select(logits, vocab, [], params, positions, None)
    for row in range(4):
        alone_params = SamplingParams(do_sample=True, top_p=0.95, seed=int(params.seed[row]))
        alone, _, _ = reference.steer_and_select(
            logits[row:row + 1], vocab, [], alone_params, positions[row:row + 1], None)
        assert alone.item() == together[row].item()


def test_bad_inputs_say_what_is_wrong():
    base = torch.zeros(2, 10)
    positions = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="vocab_size"):
        reference.steer_and_select(base, 11, [], SamplingParams(), positions, None)
    with pytest.raises(ValueError, match="temperature"):
        reference.steer_and_select(base, 10, [], SamplingParams(do_sample=True, temperature=0.0),
                                   positions, None)
    with pytest.raises(ValueError, match="top_k"):
        reference.steer_and_select(base, 10, [], SamplingParams(top_k=torch.ones(3)),
                                   positions, None)
    bad_map = SteeringOffset(torch.zeros(1, 10), None, torch.tensor([0, 1]), torch.ones(2))
    with pytest.raises(ValueError, match="packed rows"):
        reference.steer_and_select(base, 10, [bad_map], SamplingParams(), positions, None)
