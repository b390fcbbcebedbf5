"""Tiny randomly initialised models shared by the tests."""

import os

import pytest
import torch

# Triton reads this when a kernel is defined, and transformers imports triton
# early, so it is set here, before anything else loads: without a GPU the
# kernels run in Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 101
PAD, BOS, EOS = 0, 1, 2


def tiny_llama(seed: int, vocab_size: int = VOCAB, layers: int = 2, hidden: int = 32):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int, vocab_size: int = VOCAB):
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_qwen2(seed: int, vocab_size: int = VOCAB):
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD,
        bos_token_id=BOS, eos_token_id=EOS,
    )
    return Qwen2ForCausalLM(config).eval()


def left_padded(prompts: list[list[int]]):
    """(input_ids, attention_mask) of a left-padded batch."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask


PROMPTS = [[BOS, 5, 6, 7], [BOS, 8, 9, 10, 11, 12, 13], [BOS, 3], [BOS, 40, 41, 42, 43]]


@pytest.fixture
def batch():
    return left_padded(PROMPTS)
