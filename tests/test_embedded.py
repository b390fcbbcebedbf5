"""The shipped model family: files match their hashes, models load and fit together."""

import hashlib
import json

import pytest
import torch

from proxytune.loading.embedded import EMBEDDED_DIR, load_embedded_family, verify_hashes
from proxytune.steering import PromptTemplate, check_same_vocabulary
from proxytune.experiments.world import ASSISTANT, USER

pytestmark = pytest.mark.skipif(
    not (EMBEDDED_DIR / "hashes.json").is_file(),
    reason="the embedded family is not built (python examples/build_family.py)",
)


@pytest.fixture(scope="module")
def family():
    return load_embedded_family()


def test_shipped_files_match_recorded_hashes():
    recorded = json.loads((EMBEDDED_DIR / "hashes.json").read_text())
    assert {"tokenizer/tokenizer.json", "base/model.safetensors"} <= set(recorded)

    for relative, expected in recorded.items():
        digest = hashlib.sha256((EMBEDDED_DIR / relative).read_bytes()).hexdigest()
        assert digest == expected, f"{relative} differs from hashes.json"
    assert verify_hashes() == []


def test_a_changed_file_is_reported(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    digest = hashlib.sha256(b"one").hexdigest()
    (tmp_path / "hashes.json").write_text(json.dumps({"a.txt": digest, "gone.txt": digest}))
    assert verify_hashes(tmp_path) == ["gone.txt"]

    (tmp_path / "a.txt").write_text("two")
    assert verify_hashes(tmp_path) == ["a.txt", "gone.txt"]


def test_shipped_files_stay_under_25_megabytes():
    recorded = json.loads((EMBEDDED_DIR / "hashes.json").read_text())
    total = sum((EMBEDDED_DIR / relative).stat().st_size for relative in recorded)
    assert total <= 25 * 1024 * 1024


def test_family_shares_one_vocabulary_and_the_base_is_largest(family):
    vocab_size = len(family.tokenizer)
    base_params = sum(p.numel() for p in family.base.parameters())

    for pair in family.pairs.values():
        for model in (pair.expert, pair.anti_expert):
            assert model.get_output_embeddings().weight.shape[0] == vocab_size
            assert sum(p.numel() for p in model.parameters()) < base_params
    assert family.base.get_output_embeddings().weight.shape[0] == vocab_size
    assert check_same_vocabulary(family.tokenizer, family.tokenizer, "itself") == vocab_size


def test_chat_template_wraps_a_prompt_in_the_chat_markers(family):
    template = PromptTemplate.from_chat_template(family.tokenizer)
    tokens = family.tokenizer.convert_ids_to_tokens

    assert tokens(template.prefix_ids) == [USER]
    assert tokens(template.suffix_ids) == [ASSISTANT]


def test_missing_folder_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_family"):
        load_embedded_family(tmp_path)


@torch.no_grad()
def test_loaded_models_are_float32_and_in_eval_mode(family):
    assert family.base.dtype == torch.float32 and not family.base.training
    direct = family.load_direct("qa")
    assert direct.dtype == torch.float32 and not direct.training
    with pytest.raises(KeyError, match="No directly tuned"):
        family.load_direct("poetry")


def test_pairs_steer_with_the_alpha_the_build_chose(family):
    chosen = json.loads((EMBEDDED_DIR / "steering.json").read_text())["alpha"]
    assert {name: pair.alpha for name, pair in family.pairs.items()} == chosen

    overridden = load_embedded_family(alpha=0.5)
    assert {pair.alpha for pair in overridden.pairs.values()} == {0.5}
