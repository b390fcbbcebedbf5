"""The command line: generate from local folders, and its error messages."""

import torch
from transformers import PreTrainedTokenizerFast

from conftest import tiny_llama
from proxytune import ExpertPair, ProxyTunedModel
from proxytune.cli import main
from test_engine import word_tokenizer

WORDS = ["<pad>", "<s>", "</s>", "abcdef"] + [f"w{i}" for i in range(97)]


def save_family(folder):
    tokenizer = word_tokenizer(WORDS)
    tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token = "<pad>", "<s>", "</s>"
    models = {}
    for name, seed in [("base", 0), ("expert", 1), ("anti", 2)]:
        models[name] = tiny_llama(seed)
        models[name].save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    return models, tokenizer


def test_generate_streams_the_steered_text(tmp_path, capsys):
    models, tokenizer = save_family(tmp_path)
    code = main(["generate", "--base", str(tmp_path / "base"),
                 "--expert", str(tmp_path / "expert"), "--anti-expert", str(tmp_path / "anti"),
                 "--alpha", "1.5", "--max-new-tokens", "6", "w4 w5 w6"])
    assert code == 0

    model = ProxyTunedModel(models["base"], [ExpertPair("e", models["expert"],
                                                        models["anti"], alpha=1.5)])
    ids = torch.tensor([tokenizer.encode("w4 w5 w6")])
    expected = model.generate(ids, max_new_tokens=6, do_sample=False, expert="e",
                              pad_token_id=0)
    new_tokens = [t for t in expected[0, ids.shape[1]:].tolist() if t > 3]  # no specials
    expected_text = tokenizer.decode(new_tokens)
    assert expected_text in capsys.readouterr().out


def test_missing_folder_is_reported(tmp_path, capsys):
    code = main(["generate", "--base", str(tmp_path / "nowhere"), "hello"])
    assert code == 2
    assert "No model folder" in capsys.readouterr().err


def test_router_fit_then_routed_generate(tmp_path, capsys):
    import json

    save_family(tmp_path)
    calibration = tmp_path / "calib.jsonl"
    with calibration.open("w") as handle:
        for i in range(12):
            words, expert = ("w10 w11 w12", "a") if i % 2 else ("w80 w81 w82", "b")
            prompt = f"{words} w{20 + i}"
            handle.write(json.dumps({"prompt": prompt, "expert": expert}) + "\n")
    pair_a = f"a={tmp_path / 'expert'},{tmp_path / 'anti'}"
    pair_b = f"b={tmp_path / 'anti'},{tmp_path / 'expert'}"

    code = main(["router", "fit", "--signal", "base", "--base", str(tmp_path / "base"),
                 "--data", str(calibration), "--out", str(tmp_path / "router"),
                 "--clusters", "2"])
    assert code == 0
    code = main(["generate", "--base", str(tmp_path / "base"), "--pair", pair_a,
                 "--pair", pair_b, "--router", str(tmp_path / "router"),
                 "--max-new-tokens", "4", "w10 w11 w12 w50"])
    assert code == 0
    assert "### w10 w11 w12 w50" in capsys.readouterr().out
