"""generate() through the Triton kernels (interpreted on the CPU) against the torch path."""

import pytest
import torch

from conftest import left_padded, PROMPTS
from proxytune.sampling.triton_backend import triton_available
from test_engine import mixed_model

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def run_both(**settings):
    input_ids, attention_mask = left_padded(PROMPTS)
    model, _ = mixed_model()
    outputs = {}
    for backend in ("torch", "triton"):
        outputs[backend] = model.generate(input_ids, attention_mask=attention_mask,
                                          backend=backend, **settings)
    return outputs["torch"], outputs["triton"]


def test_greedy_mixed_batch_same_tokens_as_torch_path():
    torch_out, triton_out = run_both(
        max_new_tokens=5, do_sample=False, expert=["a", None, "b", "a"],
        alpha=[1.0, 0.0, 2.0, 0.5], repetition_penalty=1.2,
        return_dict_in_generate=True, output_scores=True)
    assert torch.equal(triton_out.sequences, torch_out.sequences)
    for ours, theirs in zip(triton_out.scores, torch_out.scores):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_seeded_sampling_same_tokens_as_torch_path():
    """Both backends draw from the same counter-based stream, so the draws agree."""
    torch_out, triton_out = run_both(
        max_new_tokens=4, do_sample=True, temperature=0.7, top_k=20,
        expert=["a", "b", None, "a"], seed=[3, 1, 4, 1])
    assert torch.equal(triton_out, torch_out)
