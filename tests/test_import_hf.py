import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from llm.evaluate import main as evaluate_main
from llm.import_hf import FINETUNE, main
from llm.models.gpt import swiglu_hidden
from llm.training.tasks.lm_task import load_lm
from tests.helpers import train_cli

transformers = pytest.importorskip("transformers")

CORPUS = "the quick brown fox jumps over the lazy dog; a lazy dog sleeps in the sun. " * 30


def byte_level_bpe():
    """A byte-level BPE, as GPT-2's tokenizer is."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([CORPUS], vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    return bpe


def hf_folder(tmp_path, name, config):
    """A transformers model of ``config`` and its tokenizer, saved by transformers into ``tmp_path / name``."""
    byte_level_bpe().save(str(tmp_path / "bpe.json"))
    tokenizer = transformers.GPT2TokenizerFast(tokenizer_file=str(tmp_path / "bpe.json"))
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        # transformers' init leaves biases at 0, norms at 1 and activations near 0, where the GELU variants
        # agree: unit-scale activations and biases and norms of their own let a wrong mapping show in the logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, p.size(1) ** -0.5)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / name)
    tokenizer.save_pretrained(tmp_path / name)
    return model, tokenizer, tmp_path / name


def gpt2(tmp_path, **settings):
    return hf_folder(tmp_path, "gpt2", transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                                                **settings))


def llama(tmp_path, **settings):
    settings = {"hidden_size": 32, "intermediate_size": swiglu_hidden(32), "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64,
                "rms_norm_eps": 1e-5, "rope_theta": 10000.0, **settings}
    config = transformers.LlamaConfig(**settings)
    return hf_folder(tmp_path, "llama", config)


def same_logits(theirs, tokenizer, out):
    ours, our_tokenizer, _ = load_lm(out)
    text = "the lazy fox sleeps in the sun"
    ids = our_tokenizer.encode(text)
    assert ids == tokenizer(text)["input_ids"]  # the same tokens
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_a_gpt2_imports_with_its_logits_and_tokens(tmp_path, activation, capsys):
    theirs, tokenizer, hf = gpt2(tmp_path, activation_function=activation)
    assert main([str(hf), "--out", str(tmp_path / "ours")]) == 0
    assert "imported GPT2LMHeadModel (2 layers, 32 wide" in capsys.readouterr().out
    same_logits(theirs, tokenizer, tmp_path / "ours")


def test_a_gpt2_of_another_mlp_width_and_epsilon_imports_with_its_logits(tmp_path):
    theirs, tokenizer, hf = gpt2(tmp_path, n_inner=48, layer_norm_epsilon=1e-6)
    assert main([str(hf), "--out", str(tmp_path / "ours")]) == 0
    same_logits(theirs, tokenizer, tmp_path / "ours")


def test_an_imported_model_is_scored_on_a_text_and_asked_for_one_without_it(tmp_path, capsys):
    _, _, hf = gpt2(tmp_path)
    assert main([str(hf), "--out", str(tmp_path / "ours")]) == 0
    (tmp_path / "text.txt").write_text(CORPUS)
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(tmp_path / "ours")]) == 2  # no run: no split of its data to score
    err = capsys.readouterr().err
    assert "no run's (a model llm.import_hf brought in)" in err and "--data-path FILE" in err
    assert len(err.strip().splitlines()) == 1
    assert evaluate_main(["--checkpoint", str(tmp_path / "ours"), "--data-path", str(tmp_path / "text.txt")]) == 0
    assert capsys.readouterr().out.startswith("loss ")


def test_gpt2s_own_files_without_the_transformer_prefix_nor_a_tokenizer_json_import_too(tmp_path):
    """openai-community/gpt2 keeps its weights without ``transformer.``, with the attention's mask as a buffer,
    and its tokenizer as vocab.json and merges.txt."""
    theirs, tokenizer, hf = gpt2(tmp_path)
    weights = load_file(hf / "model.safetensors")
    bare = {k.removeprefix("transformer."): v for k, v in weights.items() if k != "lm_head.weight"}
    bare |= {f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 64, 64)) for i in range(2)}
    (hf / "model.safetensors").unlink()
    torch.save(bare, hf / "pytorch_model.bin")
    (hf / "tokenizer.json").unlink()
    byte_level_bpe().save_model(str(hf))  # vocab.json and merges.txt
    assert main([str(hf), "--out", str(tmp_path / "ours")]) == 0
    same_logits(theirs, tokenizer, tmp_path / "ours")
    text = "one document<|endoftext|>the next"  # the end of text stays one token, as transformers reads it
    assert load_lm(tmp_path / "ours")[1].encode(text) == tokenizer(text)["input_ids"]


@pytest.mark.parametrize("tied, bias", [(False, False), (True, True)])
def test_a_llama_of_our_shape_imports_with_its_logits(tmp_path, tied, bias):
    theirs, tokenizer, hf = llama(tmp_path, tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias)
    assert main([str(hf), "--out", str(tmp_path / "ours")]) == 0
    same_logits(theirs, tokenizer, tmp_path / "ours")
    # its config's ends of text (1, 2) are plain tokens of this tokenizer, not special ones: no separator
    assert "separator" not in yaml.safe_load((tmp_path / "ours" / FINETUNE).read_text())["data"]


def test_a_released_llamas_grouped_queries_width_rotary_base_and_epsilon_import_with_its_logits(tmp_path, capsys):
    """TinyLlama, SmolLM and Llama 3 (without rotary scaling) differ from our defaults in all four."""
    theirs, tokenizer, hf = llama(tmp_path, num_key_value_heads=2, intermediate_size=72, rope_theta=500000.0,
                                  rms_norm_eps=1e-6)
    assert main([str(hf), "--out", str(tmp_path / "ours")]) == 0
    settings = yaml.safe_load((tmp_path / "ours" / FINETUNE).read_text())["model"]
    assert (settings["n_kv_head"], settings["mlp_hidden"], settings["rope_base"], settings["norm_eps"]) == \
        (2, 72, 500000.0, 1e-6)
    same_logits(theirs, tokenizer, tmp_path / "ours")


def test_a_mistral_imports_with_its_sliding_window_as_the_context(tmp_path, capsys):
    """Over a context no longer than the window, Mistral's sliding-window attention is a full causal one. Its
    heads are wider than hidden_size / heads here, as Mistral NeMo's are: model.head_size."""
    config = transformers.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                                        sliding_window=6, rms_norm_eps=1e-5, rope_theta=1e6, head_dim=12)
    theirs, tokenizer, hf = hf_folder(tmp_path, "mistral", config)
    assert main([str(hf), "--out", str(tmp_path / "ours")]) == 0
    assert "imported MistralForCausalLM (2 layers, 32 wide, context 6," in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "ours" / FINETUNE).read_text())["model"]["head_size"] == 12
    ours, our_tokenizer, _ = load_lm(tmp_path / "ours")
    x = torch.tensor([our_tokenizer.encode("the lazy fox sleeps in the sun")[:6]])
    assert x.size(1) == 6
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, rtol=1e-4, atol=1e-5)


def test_a_llama_given_its_bos_in_the_prompt_generates_as_transformers_does(tmp_path, capsys):
    """transformers puts <s> in front of a Llama's prompt; llm.generate encodes a prompt as the corpus is, without
    a template's tokens, and reads the <s> written in the prompt as that token."""
    from tokenizers import processors

    from llm.generate import main as generate

    theirs, tokenizer, hf = llama(tmp_path)
    document = json.loads((hf / "tokenizer.json").read_text())
    bos = next(t["id"] for t in document["added_tokens"] if t["content"] == "<|endoftext|>")
    document["post_processor"] = json.loads(processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]).__getstate__())
    (hf / "tokenizer.json").write_text(json.dumps(document))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf / "tokenizer.json"))
    assert main([str(hf), "--out", str(tmp_path / "ours")]) == 0
    ids = tokenizer("the lazy fox")["input_ids"]
    assert ids[0] == bos
    with torch.no_grad():
        continued = theirs.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    capsys.readouterr()
    prompt = "<|endoftext|>the lazy fox"
    assert generate(["--checkpoint", str(tmp_path / "ours"), "--prompt", prompt, "--max-new-tokens", "8",
                     "--temperature", "0"]) == 0
    assert capsys.readouterr().out == prompt + tokenizer.decode(continued) + "\n"


def test_a_qwen2_and_a_llama_3_2_with_its_rotary_scaling_import_with_their_logits(tmp_path, capsys):
    """Qwen2 has biases in its query, key and value projections alone; Llama 3.1 and 3.2 stretch the rotary
    positions' long wavelengths."""
    config = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=1e6, tie_word_embeddings=True)
    theirs, tokenizer, hf = hf_folder(tmp_path, "qwen2", config)
    assert main([str(hf), "--out", str(tmp_path / "qwen2-llm")]) == 0
    assert yaml.safe_load((tmp_path / "qwen2-llm" / FINETUNE).read_text())["model"]["qkv_bias"] is True
    same_logits(theirs, tokenizer, tmp_path / "qwen2-llm")
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    theirs, tokenizer, hf = llama(tmp_path, rope_scaling=scaling, max_position_embeddings=16384, rope_theta=5e5)
    assert main([str(hf), "--out", str(tmp_path / "llama-llm")]) == 0
    assert yaml.safe_load((tmp_path / "llama-llm" / FINETUNE).read_text())["model"]["rope_scaling"] == 32.0
    same_logits(theirs, tokenizer, tmp_path / "llama-llm")


def test_a_qwen3_imports_with_its_query_and_key_norms_and_exports_back_as_a_qwen3(tmp_path, capsys):
    """Qwen3 normalises each head's query and key before the rotary positions, our model.qk_norm."""
    from llm.export import main as export

    settings = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 64, "rope_theta": 1e6}
    theirs, tokenizer, hf = hf_folder(tmp_path, "qwen3", transformers.Qwen3Config(head_dim=8, **settings))
    assert main([str(hf), "--out", str(tmp_path / "qwen3-llm")]) == 0
    model = yaml.safe_load((tmp_path / "qwen3-llm" / FINETUNE).read_text())["model"]
    assert model["qk_norm"] is True and model["qkv_bias"] is False and model["bias"] is False
    same_logits(theirs, tokenizer, tmp_path / "qwen3-llm")
    assert export(["--checkpoint", str(tmp_path / "qwen3-llm"), "--format", "hf", "--out", str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back).__name__ == "Qwen3ForCausalLM"
    x = torch.tensor([tokenizer("the lazy fox sleeps in the sun")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, theirs(x).logits, rtol=1e-4, atol=1e-5)
    # released Qwen3s of some sizes (0.6B, 4B) have heads wider than hidden_size / heads: model.head_size
    theirs, tokenizer, wide = hf_folder(tmp_path, "wide", transformers.Qwen3Config(head_dim=16, **settings))
    assert main([str(wide), "--out", str(tmp_path / "wide-llm")]) == 0
    assert yaml.safe_load((tmp_path / "wide-llm" / FINETUNE).read_text())["model"]["head_size"] == 16
    same_logits(theirs, tokenizer, tmp_path / "wide-llm")
    # a config.json without head_dim has transformers' default for a Qwen3, 128, not hidden_size / heads: these
    # weights are not of the model it describes
    saved = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "head_dim"}))
    capsys.readouterr()
    assert main([str(wide), "--out", str(tmp_path / "no-head-dim")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "size mismatch" in err and "blocks.0.attn.qkv.weight" in err, err
    (wide / "config.json").write_text(json.dumps({**saved, "attention_bias": True}))  # o_proj's too: not ours
    assert main([str(wide), "--out", str(tmp_path / "biased")]) == 2
    assert "Qwen3 with attention_bias true (ours: none in a Qwen3)" in capsys.readouterr().err


def test_a_qwen2_whose_later_layers_slide_imports_with_its_window_as_the_context(tmp_path, capsys):
    config = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      use_sliding_window=True, sliding_window=6, max_window_layers=1)
    theirs, tokenizer, hf = hf_folder(tmp_path, "qwen2", config)
    assert main([str(hf), "--out", str(tmp_path / "ours")]) == 0
    assert "context 6," in capsys.readouterr().out
    ours, our_tokenizer, _ = load_lm(tmp_path / "ours")
    x = torch.tensor([our_tokenizer.encode("the lazy fox sleeps in the sun")[:6]])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, rtol=1e-4, atol=1e-5)


def test_the_rotary_base_transformers_reads_first_is_the_one_imported(tmp_path):
    """transformers 5 reads rope_parameters before a rope_theta beside it, which a hand-edited file may keep."""
    theirs, tokenizer, hf = llama(tmp_path, rope_theta=500000.0)
    saved = json.loads((hf / "config.json").read_text())
    assert saved["rope_parameters"]["rope_theta"] == 500000.0
    (hf / "config.json").write_text(json.dumps({**saved, "rope_theta": 10000.0}))
    assert main([str(hf), "--out", str(tmp_path / "ours")]) == 0
    assert yaml.safe_load((tmp_path / "ours" / FINETUNE).read_text())["model"]["rope_base"] == 500000.0


@pytest.mark.parametrize("rope, named", [
    ("default", "rope_parameters 'default' (expected a mapping)"),
    ({"rope_type": "llama3", "rope_theta": 10000.0}, "rotary scaling {'rope_type': 'llama3'"),
    ({"rope_type": "default", "rope_theta": "high"}, "rope_theta 'high' (expected a number > 0)"),
])
def test_rotary_settings_that_cannot_be_read_are_one_line(tmp_path, capsys, rope, named):
    _, _, hf = llama(tmp_path)
    saved = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**saved, "rope_parameters": rope}))
    capsys.readouterr()
    assert main([str(hf), "--out", str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err


def test_what_our_gpt_cannot_compute_is_refused_in_one_line_naming_it(tmp_path, capsys):
    _, _, hf = llama(tmp_path, rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True)
    capsys.readouterr()  # transformers' own progress lines
    assert main([str(hf), "--out", str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "biases in the attention or the MLP alone (ours: both or neither)" in err
    assert "rotary scaling" in err and "'linear'" in err and not (tmp_path / "ours").exists()
    (hf / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main([str(hf), "--out", str(tmp_path / "ours")]) == 2
    assert "model_type 'bert': the models read are gpt2 (GPT2LMHeadModel), llama" in capsys.readouterr().err
    assert main([str(tmp_path), "--out", str(tmp_path / "ours")]) == 2
    assert "holds no config.json: name a transformers model folder" in capsys.readouterr().err


def test_an_import_writes_only_into_a_new_folder(tmp_path, capsys, monkeypatch):
    _, _, hf = gpt2(tmp_path)
    capsys.readouterr()
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "notes.txt").write_text("mine")
    assert main([str(hf), "--out", str(tmp_path / "ours")]) == 2
    assert "exists and is not an empty folder: import into a new one" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "ours").iterdir()] == ["notes.txt"]
    assert main([str(hf), "--out", str(tmp_path / "ours" / "notes.txt" / "model")]) == 2  # under a file
    assert "--out: cannot write" in capsys.readouterr().err
    assert main([str(hf), "--out", str(tmp_path / "first")]) == 0
    inside = tmp_path / "first" / "checkpoints" / "step_00000000" / "again"
    assert main([str(hf), "--out", str(inside)]) == 2  # retention would delete it with the checkpoint
    assert "would write into a checkpoint folder" in capsys.readouterr().err
    assert not inside.exists() and not inside.with_name(".again.importing").exists()
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    for here in (".", "./", "sub/.."):  # empty, but a folder no rename can replace so named
        assert main([str(hf), "--out", here]) == 2
        assert "names the current folder or its parent: name a new folder" in capsys.readouterr().err
    assert not any((tmp_path / "empty").iterdir())
    assert main([str(hf), "--out", str(tmp_path / "empty")]) == 0  # named by its path, it can
    assert (tmp_path / "empty" / "finetune.yaml").is_file()


def test_the_imported_model_fine_tunes_from_its_finetune_yaml_and_exports_back(tmp_path):
    theirs, tokenizer, hf = gpt2(tmp_path, bos_token_id=0, eos_token_id=0)  # <|endoftext|>, as GPT-2's 50256
    assert main([str(hf), "--out", str(tmp_path / "gpt2-llm")]) == 0
    settings = yaml.safe_load((tmp_path / "gpt2-llm" / FINETUNE).read_text())
    assert settings["model"]["mlp"] == "gelu_tanh" and settings["model"]["pos_emb"] == "learned"
    assert settings["data"]["separator"] == "<|endoftext|>"  # between the documents, as GPT-2 was trained
    assert settings["optimizer"] == {"lr": 3e-5, "scheduler": "constant"}  # a fine-tune's, not training from scratch's
    (tmp_path / "docs").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "docs" / name).write_text(CORPUS * 3)
    out = train_cli("--config", str(tmp_path / "gpt2-llm" / FINETUNE), "--data-path", "docs",
                    "--data-cache-dir", "cache", "--training-max-steps", "3", "--training-batch-size", "2",
                    "--model-block-size", "32", "--training-eval-every-steps", "1", "--logging-log-dir", "runs/ft",
                    cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    [tokens] = (tmp_path / "cache").glob("*/tokens.bin")
    assert np.fromfile(tokens, dtype=np.uint16).tolist().count(0) == 1  # one <|endoftext|>, between the files
    assert "started from the weights of" in out.stdout  # its 64 learned positions cut to the first 32
    ours = load_lm(tmp_path / "gpt2-llm")[0]
    first = torch.load(next((tmp_path / "runs/ft/checkpoints").glob("step_*")) / "state.pt", weights_only=True)
    assert first["model"]["pos_emb.weight"].shape == (32, 32)
    assert not torch.equal(first["model"]["pos_emb.weight"], ours.pos_emb.weight[:32])  # trained on from there
    from llm.export import main as export

    assert export(["--checkpoint", str(tmp_path / "runs/ft"), "--format", "hf", "--out", str(tmp_path / "back")]) == 0
    assert json.loads((tmp_path / "back/config.json").read_text())["activation_function"] == "gelu_new"


def test_a_folder_that_cannot_be_read_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    _, _, hf = gpt2(tmp_path)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "n_head": 5}))
    capsys.readouterr()
    assert main([str(hf), "--out", str(tmp_path / "ours")]) == 2
    assert "config.json: GPTConfig.n_embd (32) must be a multiple of n_head (5)" in capsys.readouterr().err
    (hf / "config.json").write_text(json.dumps(config))
    (hf / "tokenizer.json").unlink()
    (hf / "merges.txt").write_text("a line of three\n")
    (hf / "vocab.json").write_text("{}")
    assert main([str(hf), "--out", str(tmp_path / "ours")]) == 2
    assert "cannot read the tokenizer in" in capsys.readouterr().err
    byte_level_bpe().save_model(str(hf))

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("llm.import_hf.write_atomically", full)
    assert main([str(hf), "--out", str(tmp_path / "ours")]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bpe.json", "gpt2"]  # no folder, whole or half
