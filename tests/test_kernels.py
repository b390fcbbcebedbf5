"""The Triton kernels against the PyTorch reference path.

On a machine without CUDA the kernels run in Triton's interpreter: this module
sets ``TRITON_INTERPRET=1`` (unless it is already set) before the kernels are
imported, since Triton reads it when a kernel is defined.  With CUDA and the
variable unset or ``0`` they run compiled on the GPU (benchmarks/gpu_check.sh).
Sizes are chosen for the interpreter.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

import proxytune_kernels.steer_sample as steer_kernels  # noqa: E402
from proxytune.sampling import reference, triton_backend  # noqa: E402
from proxytune.sampling.params import SamplingParams, SteeringOffset  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("compiled Triton needs a CUDA device", allow_module_level=True)
if INTERPRETED and not all("Interpreted" in type(fn).__name__
                           for fn in (steer_kernels._pass_kernel, tl.max)):
    # Triton decides per @triton.jit function, when it is defined, whether to interpret it
    pytest.fail("triton was imported before TRITON_INTERPRET=1 was set: set it at the top "
                "of tests/conftest.py, before transformers (which imports triton).",
                pytrace=False)


def _inputs(batch, vocab, routed_rows_per_pair, seed, pad=3, with_anti=(True, True)):
    """Base logits with -inf entries and a tied maximum, plus packed pairs."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, vocab + pad, generator=generator) * 2
    base[:, 5] = float("-inf")
    base[0, 7] = base[0, 9] = base[0].max() + 1.0  # a tie for the maximum in row 0
    offsets = []
    for rows, anti in zip(routed_rows_per_pair, with_anti):
        row_map = torch.full((batch,), -1, dtype=torch.int32)
        row_map[rows] = torch.arange(len(rows), dtype=torch.int32)
        expert = torch.randn(len(rows), vocab + 2 * pad, generator=generator)
        anti_logits = torch.randn(len(rows), vocab + pad, generator=generator) if anti else None
        alpha = torch.rand(batch, generator=generator) + 0.5
        offsets.append(SteeringOffset(expert.to(DEVICE), None if anti_logits is None
                                      else anti_logits.to(DEVICE), row_map.to(DEVICE),
                                      alpha.to(DEVICE)))
    prev = torch.randint(-1, vocab, (batch, 5), generator=generator)  # -1: padding
    positions = torch.arange(batch, dtype=torch.long) + 4
    return base.to(DEVICE), offsets, positions.to(DEVICE), prev.to(DEVICE)


def _compare(params, base, vocab, offsets, positions, prev):
    expected = reference.steer_and_select(base, vocab, offsets, params, positions, prev,
                                          return_logprobs=True, return_scores=True)
    got = triton_backend.steer_and_select(base, vocab, offsets, params, positions, prev,
                                          return_logprobs=True, return_scores=True)
    assert got[0].tolist() == expected[0].tolist()
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(got[2]), torch.isinf(expected[2])), "different tokens kept"
    finite = ~torch.isinf(expected[2])
    torch.testing.assert_close(got[2][finite], expected[2][finite], atol=1e-5, rtol=1e-5)
    return got


# shape -> the branch it exercises
GREEDY_CASES = [
    pytest.param(1, 32000, [[0]], id="batch1-vocab32000-one-pair-many-chunks"),
    pytest.param(3, 111, [], id="batch3-vocab111-no-pair"),
    pytest.param(3, 111, [[0, 2]], id="batch3-one-pair-row1-unsteered"),
    pytest.param(3, 111, [[1], [0, 1]], id="batch3-two-pairs-soft-routing"),
]


@pytest.mark.parametrize("batch, vocab, routed", GREEDY_CASES)
@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_greedy_matches_reference(batch, vocab, routed, penalty):
    base, offsets, positions, prev = _inputs(batch, vocab, routed, seed=batch + vocab)
    params = SamplingParams(repetition_penalty=penalty)
    tokens, _, _ = _compare(params, base, vocab, offsets, positions, prev)
    if not routed and penalty == 1.0:
        assert tokens[0].item() == 7, "the lowest id among tied maxima"


SAMPLING_CASES = [
    pytest.param(dict(temperature=0.8), id="plain-one-pass"),
    pytest.param(dict(top_k=7), id="top-k"),
    pytest.param(dict(top_p=0.7, temperature=1.3), id="top-p"),
    pytest.param(dict(min_p=0.05), id="min-p"),
    pytest.param(dict(top_k=40, top_p=0.9, min_p=0.01, repetition_penalty=1.2),
                 id="all-filters"),
    pytest.param(dict(top_k=torch.tensor([0, 3, 60]), top_p=torch.tensor([0.5, 1.0, 0.95]),
                      temperature=torch.tensor([0.5, 1.0, 2.0]),
                      min_p=torch.tensor([0.0, 0.2, 0.0]), seed=torch.tensor([4, 5, 6])),
                 id="per-row-knobs"),
]


@pytest.mark.parametrize("knobs", SAMPLING_CASES)
def test_sampling_matches_reference(knobs):
    base, offsets, positions, prev = _inputs(3, 111, [[0, 2]], seed=11)
    params = SamplingParams(do_sample=True, **{"seed": 123, **knobs})
    _compare(params, base, 111, offsets, positions, prev)


def test_top_p_on_a_large_vocabulary_and_ties_at_the_cut():
    base, offsets, positions, prev = _inputs(3, 32000, [[1]], seed=5)
    base[2] = torch.round(base[2])  # many exactly tied scores around every cut
    params = SamplingParams(do_sample=True, top_p=0.9, top_k=torch.tensor([0, 0, 5000]),
                            seed=9)
    _compare(params, base, 32000, offsets, positions, prev)


def test_narrowing_over_several_pivot_passes(monkeypatch):
    monkeypatch.setattr(steer_kernels, "COLLECT_TARGET", 4)
    base, offsets, positions, prev = _inputs(3, 2000, [[0]], seed=8)
    params = SamplingParams(do_sample=True, top_k=torch.tensor([1, 17, 300]), top_p=0.6,
                            seed=2)
    _compare(params, base, 2000, offsets, positions, prev)


def test_more_than_two_pairs_are_folded_in():
    base, offsets, positions, prev = _inputs(3, 111, [[0, 1], [1], [0, 1, 2]], seed=3,
                                             with_anti=(True, False, True))
    _compare(SamplingParams(), base, 111, offsets, positions, prev)
    _compare(SamplingParams(do_sample=True, top_p=0.8, seed=1), base, 111, offsets,
             positions, prev)


def test_kernel_draws_follow_the_filtered_distribution():
    generator = torch.Generator().manual_seed(21)
    vocab, draws = 10, 200
    logits = (torch.randn(1, vocab, generator=generator) * 1.5).expand(draws, vocab)
    logits = logits.contiguous().to(DEVICE)
    params = SamplingParams(do_sample=True, top_k=6, top_p=0.9,
                            seed=torch.arange(draws, device=DEVICE) * 104729 + 17)
    positions = torch.full((draws,), 3, device=DEVICE)
    tokens, _, scores = triton_backend.steer_and_select(logits, vocab, [], params, positions,
                                                        None, return_scores=True)
    same_seed, _, _ = reference.steer_and_select(logits, vocab, [], params, positions, None)
    assert tokens.tolist() == same_seed.tolist(), "the reference RNG draws the same tokens"

    expected = torch.softmax(scores[0].cpu().double(), dim=0)
    counts = torch.bincount(tokens.cpu(), minlength=vocab).double()
    assert counts[expected == 0].sum() == 0, "a filtered token was drawn"
    kept = expected > 0
    chi_square = ((counts[kept] - draws * expected[kept]) ** 2 / (draws * expected[kept])).sum()
    # 99.99th percentile of chi-square with at most 5 degrees of freedom is about 25.7
    assert chi_square < 26.0, f"chi-square {chi_square:.1f}"


def test_a_rows_draw_ignores_batch_and_chunking():
    base, offsets, positions, prev = _inputs(3, 700, [[0, 2]], seed=13)
    kwargs = dict(do_sample=True, top_p=0.9, min_p=0.01, seeds=torch.tensor([7, 8, 9]),
                  positions=positions, prev_tokens=prev, repetition_penalty=1.1)
    pairs = [steer_kernels.SteerPair(o.expert_logits, o.anti_logits, o.row_map, o.alpha)
             for o in offsets]
    together, _, _ = steer_kernels.sample_next_tokens(base, 700, pairs, block=64, chunk_size=128,
                                                **kwargs)
    for row in range(3):
        single = {**kwargs, "seeds": kwargs["seeds"][row:row + 1],
                  "positions": positions[row:row + 1], "prev_tokens": prev[row:row + 1]}
        row_pairs = [steer_kernels.SteerPair(p.expert, p.anti, p.row_map[row:row + 1],
                                             p.alpha[row:row + 1]) for p in pairs]
        alone, _, _ = steer_kernels.sample_next_tokens(base[row:row + 1], 700, row_pairs,
                                                 block=128, **single)
        assert alone.item() == together[row].item()


def test_choose_backend_reads_the_environment(monkeypatch, caplog):
    monkeypatch.setattr(triton_backend, "_logged_choices", set())
    monkeypatch.setenv("PROXYTUNE_SAMPLER", "auto")
    with caplog.at_level("INFO", logger=triton_backend.__name__):
        assert triton_backend.choose_backend("cpu") == "torch"
        assert triton_backend.choose_backend("cpu") == "torch"
    assert len(caplog.records) == 1, "the choice is logged once"
    monkeypatch.setenv("PROXYTUNE_SAMPLER", "torch")
    assert triton_backend.choose_backend(DEVICE) == "torch"
    monkeypatch.setenv("PROXYTUNE_SAMPLER", "triton")
    assert triton_backend.choose_backend(DEVICE) == "triton"
    monkeypatch.setenv("PROXYTUNE_SAMPLER", "fast")
    with pytest.raises(ValueError, match="PROXYTUNE_SAMPLER"):
        triton_backend.choose_backend(DEVICE)


def test_bad_knob_values_are_refused():
    base, offsets, positions, prev = _inputs(2, 111, [], seed=1)
    with pytest.raises(ValueError, match="top_p"):
        triton_backend.steer_and_select(base, 111, offsets, SamplingParams(top_p=1.5),
                                        positions, prev)
    with pytest.raises(ValueError, match="vocab_size"):
        triton_backend.steer_and_select(base, 500, offsets, SamplingParams(), positions, prev)
