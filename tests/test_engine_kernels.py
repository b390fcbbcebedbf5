"""generate() through the Triton kernels (interpreted on the CPU) against the torch path."""

import pytest
import torch

from conftest import left_padded, PROMPTS, tiny_llama
from proxytune import ExpertPair
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


class TokenRecorder:
    """A streamer that keeps every put() it gets."""

    def __init__(self):
        self.puts = []

    def put(self, tokens):
        self.puts.append(tokens.tolist())

    def end(self):
        pass


def test_nan_mid_generation_stops_both_backends_at_the_same_step():
    """The expert's embedding is NaN for every token outside the prompts, so its
    logits turn NaN once it reads the first new token: both backends must raise
    there, before any token picked from those logits is streamed."""
    input_ids, attention_mask = left_padded(PROMPTS)
    prompt_tokens = sorted({token for prompt in PROMPTS for token in prompt})
    recorded = {}
    for backend in ("torch", "triton"):
        model, _ = mixed_model()
        expert = tiny_llama(7, layers=1)
        with torch.no_grad():
            keep = expert.model.embed_tokens.weight[prompt_tokens].clone()
            expert.model.embed_tokens.weight.fill_(float("nan"))
            expert.model.embed_tokens.weight[prompt_tokens] = keep
        model.add_pair(ExpertPair("broken", expert, tiny_llama(8, layers=1)))
        streamer = TokenRecorder()
        with pytest.raises(FloatingPointError, match="broken.expert"):
            model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6,
                           do_sample=False, expert="broken", backend=backend,
                           streamer=streamer)
        recorded[backend] = streamer.puts
    assert 1 <= len(recorded["torch"]) < 6  # finite at first, NaN within the budget
    assert recorded["triton"] == recorded["torch"]
