import dataclasses
import errno
import json
import os
import shutil
import stat
import sys

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llm import export
from llm.data.tokenizers import load_tokenizer
from llm.export import main
from llm.models.gpt import GPT, GPTConfig
from llm.training.core.engine import TrainingEngine
from llm.training.tasks.lm_task import LMTask, load_lm
from llm.training.tasks.regression_task import RegressionTask
from llm.training import train
from llm.training.core import checkpoint
from tests.helpers import lm_config, run, tiny_config


def test_export_regression_weights_load_back_strictly(tmp_path, monkeypatch):
    config = tiny_config(tmp_path)
    engine = TrainingEngine(config, RegressionTask(config), 0, 1)
    engine.train()
    out = tmp_path / "export/model.safetensors"
    reads = []
    monkeypatch.setattr(checkpoint, "_load_torch", lambda path, *a, _load=checkpoint._load_torch: reads.append(path)
                        or _load(path, *a))
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert [path.name for path in reads] == ["state.pt"]  # read once: it holds the optimizer's state too
    description = json.loads(out.with_suffix(".json").read_text())
    assert description["task"] == "regression" and description["step"] == engine.step
    model = RegressionTask(config).build_model()
    model.load_state_dict(load_file(out), strict=True)
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x), engine.raw_model(x), rtol=0, atol=0)


def test_each_export_has_a_description_of_its_own_whatever_dots_its_name_holds(tmp_path, capsys):
    config = tiny_config(tmp_path)
    TrainingEngine(config, RegressionTask(config), 0, 1).train()
    for name in ("gpt-v1.1", "gpt-v1.2"):  # no suffix to replace: the second must not take the first's .json
        assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / name)]) == 0
        assert capsys.readouterr().out.endswith(f"(+ {name}.json)\n")
        assert json.loads((tmp_path / f"{name}.json").read_text())["weights"] == name
    assert not (tmp_path / "gpt-v1.json").exists()
    (tmp_path / "a.json").write_text((tmp_path / "gpt-v1.1.json").read_text())  # another export's description
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "a.safetensors")]) == 2
    assert "a.json exists and is not the description of an export to a.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "a.safetensors").exists()


def test_export_lm_with_tied_embeddings(tmp_path, capsys):
    config = lm_config(tmp_path, training={"max_steps": 3})
    engine = TrainingEngine(config, LMTask(config), 0, 1)
    engine.train()
    out = tmp_path / "lm.safetensors"
    assert main(["--checkpoint", str(tmp_path / "run/checkpoints"), "--out", str(out)]) == 0
    description = json.loads(out.with_suffix(".json").read_text())
    model = GPT(GPTConfig.from_dict(description["model_config"]))
    model.load_state_dict(load_file(out), strict=True)
    assert description["model_config"]["tie_embeddings"] is True
    trained_weights = engine.raw_model.state_dict()  # the trained weights themselves, the tied ones once
    assert model.state_dict().keys() == trained_weights.keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained_weights[name]), name
    assert model.lm_head.weight is model.tok_emb.weight  # tied again on load
    # the tokenizer goes beside the weights: the export alone turns ids back into text
    assert description["tokenizer"] == "lm.tokenizer.json"
    _, trained, _ = load_lm(tmp_path / "run")
    exported = load_tokenizer(tmp_path / "lm.tokenizer.json")
    assert exported.fingerprint() == trained.fingerprint() and exported.decode(trained.encode("the cat")) == "the cat"
    assert main(["--checkpoint", str(tmp_path / "run/checkpoints"), "--out", str(out)]) == 0  # an earlier export's: replaced
    regression = tiny_config(tmp_path / "regression")
    TrainingEngine(regression, RegressionTask(regression), 0, 1).train()
    assert main(["--checkpoint", str(tmp_path / "regression/run"), "--out", str(out)]) == 0  # no tokenizer: the earlier one goes
    assert not (tmp_path / "lm.tokenizer.json").exists()
    capsys.readouterr()
    assert main(["--checkpoint", str(tmp_path / "run/checkpoints"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.endswith(f"to {out} (+ lm.json, lm.tokenizer.json)\n")
    (tmp_path / "other.tokenizer.json").write_text("notes of mine\n")
    assert main(["--checkpoint", str(tmp_path / "run/checkpoints"), "--out", str(tmp_path / "other.safetensors")]) == 2
    assert (tmp_path / "other.tokenizer.json").read_text() == "notes of mine\n"
    assert not (tmp_path / "other.safetensors").exists()


def test_export_replaces_an_earlier_export_but_not_another_safetensors_file(tmp_path, capsys):
    config = tiny_config(tmp_path)
    TrainingEngine(config, RegressionTask(config), 0, 1).train()
    out = tmp_path / "model.safetensors"
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0  # an earlier export: replaced
    downloaded = tmp_path / "downloaded.safetensors"
    save_file({"wte": torch.zeros(3)}, str(downloaded), metadata={"format": "pt"})
    before = downloaded.read_bytes()
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(downloaded)]) == 2
    assert "is not an earlier export" in capsys.readouterr().err and downloaded.read_bytes() == before


def test_an_export_that_fails_part_way_leaves_the_earlier_export_whole(tmp_path, monkeypatch, capsys):
    runs = []
    for name, seed in (("a", 0), ("b", 1)):
        config = tiny_config(tmp_path / name)
        config.training.seed = seed
        TrainingEngine(config, RegressionTask(config), 0, 1).train()
        runs.append(str(tmp_path / name / "run"))
    out = tmp_path / "model.safetensors"
    assert main(["--checkpoint", runs[0], "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert sorted(before) == ["model.json", "model.safetensors"]
    write_text = type(out).write_text

    def disk_full_at_the_description(path, *args, **kwargs):  # the weights are written by then
        if path.name.lstrip(".").startswith("model.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(type(out), "write_text", disk_full_at_the_description)
    assert main(["--checkpoint", runs[1], "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: cannot write {tmp_path / 'model.json'}: No space left on device\n"
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # no temporary file left


def test_an_out_that_is_a_folder_or_inside_the_checkpoints_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path)
    TrainingEngine(config, RegressionTask(config), 0, 1).train()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for out, expected in [
        (".", "--out . is a folder"),
        ("", "--out . is a folder"),
        ("exports/", "--out exports is a folder: name the file to write, such as exports/model.safetensors"),
        ("exports/.", "--out exports is a folder: name the file to write, such as exports/model.safetensors"),
        ("run/checkpoints/step_00000028/mine.safetensors", "would write into a checkpoint folder"),
        ("run/checkpoints/mine.safetensors", "would write into a checkpoint folder"),
        ("model.pt", "--out model.pt: the weights are written as safetensors, which torch.load does not read: "
                     "name them model.safetensors"),
    ]:
        assert main(["--checkpoint", "run", "--out", out]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, out
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.fixture
def umask_002():
    old = os.umask(0o002)  # not the usual 022: the files must follow the umask, not a fixed mode
    yield
    os.umask(old)


def test_exported_files_follow_the_umask(tmp_path, umask_002):
    config = tiny_config(tmp_path)
    TrainingEngine(config, RegressionTask(config), 0, 1).train()
    out = tmp_path / "model.safetensors"
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0  # safetensors alone makes its files 0600
    assert [oct(stat.S_IMODE(p.stat().st_mode)) for p in (out, out.with_suffix(".json"))] == [oct(0o664)] * 2


def test_a_corrupt_newest_checkpoint_is_skipped_with_a_one_line_warning(tmp_path):
    config = tiny_config(tmp_path, checkpoint={"every_n_steps": 10})
    TrainingEngine(config, RegressionTask(config), 0, 1).train()
    newest = tmp_path / "run/checkpoints/step_00000028"
    state = bytearray((newest / "state.pt").read_bytes())
    state[-100] ^= 0xFF
    (newest / "state.pt").write_bytes(bytes(state))
    result = run([sys.executable, "-m", "llm.export", "--checkpoint", "run", "--out", "m.safetensors"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"warning: skipping checkpoint {newest.relative_to(tmp_path)}: " \
                            f"state.pt does not match its sha256 checksum\n"
    assert "step_00000020" in result.stdout


@pytest.mark.parametrize("fmt", ["safetensors", "hf"])
def test_an_export_of_a_live_runs_folder_takes_the_newest_again_when_the_one_it_reads_is_pruned(tmp_path, monkeypatch,
                                                                                                 fmt):
    if fmt == "hf":
        pytest.importorskip("transformers")
    config = lm_config(tmp_path, model={"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu"})
    TrainingEngine(config, LMTask(config), 0, 1).train()
    folder = tmp_path / "run/checkpoints"

    def saved_and_pruned(read):  # as the export starts reading, the run saves step 9 and its retention deletes step 6
        def reading(ckpt, *rest, **options):
            if ckpt.name == "step_00000006" and ckpt.exists():
                shutil.copytree(ckpt, folder / "step_00000009")
                (folder / "latest").write_text("step_00000009\n")
                shutil.rmtree(ckpt)
            return read(ckpt, *rest, **options)
        return reading

    for name in ("load_shared_state", "model_weights"):  # whichever reads first
        monkeypatch.setattr(export, name, saved_and_pruned(getattr(export, name)))
    write = export.export_hf if fmt == "hf" else export.export
    taken = write(folder, tmp_path / "out")
    assert (taken[0] if fmt == "hf" else taken) == folder / "step_00000009"



@pytest.mark.parametrize("fmt", ["safetensors", "hf"])
def test_an_export_whose_checkpoint_is_pruned_after_its_weights_are_read_is_made_from_the_newest_whole(
        tmp_path, monkeypatch, fmt):
    # the weights read, the run's retention deletes the checkpoint before its tokenizer is looked for: found
    # missing, it had been taken as a model without one, and exported so
    if fmt == "hf":
        pytest.importorskip("transformers")
    config = lm_config(tmp_path, model={"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu"},
                       data={"tokenizer": "bpe", "vocab_size": 300})
    TrainingEngine(config, LMTask(config), 0, 1).train()
    folder = tmp_path / "run/checkpoints"
    read = export.model_weights

    def read_then_pruned(ckpt, *rest):
        weights = read(ckpt, *rest)
        if ckpt.name == "step_00000006":
            shutil.copytree(ckpt, folder / "step_00000009")
            (folder / "latest").write_text("step_00000009\n")
            shutil.rmtree(ckpt)
        return weights

    monkeypatch.setattr(export, "model_weights", read_then_pruned)
    if fmt == "hf":
        taken, _, with_tokenizer = export.export_hf(folder, tmp_path / "out")
        assert with_tokenizer and (tmp_path / "out/tokenizer.json").is_file()
    else:
        taken = export.export(folder, tmp_path / "out/model.safetensors")
        assert json.loads((tmp_path / "out/model.json").read_text())["tokenizer"] == "model.tokenizer.json"
        assert (tmp_path / "out/model.tokenizer.json").is_file()
    assert taken == folder / "step_00000009"

def test_export_of_a_missing_checkpoint_exits_2(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert capsys.readouterr().err == f"error: checkpoint path {tmp_path / 'nope'} does not exist\n"


# ---- --format hf: a Hugging Face transformers GPT-2, Llama, Qwen2 or Qwen3 --------------

GPT2_FLAGS = ["--model-pos-emb", "learned", "--model-norm", "layernorm", "--model-mlp", "gelu"]


def train_lm(tmp_path, *flags):
    """A tiny LM trained through the command line's own main(), in this process."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200)))
    assert train.main(["--task", "lm", "--data-path", str(corpus), "--data-cache-dir", str(tmp_path / "cache"),
                       "--training-max-steps", "4", "--training-batch-size", "4", "--optimizer-lr", "0.01",
                       "--model-n-layer", "2", "--model-n-embd", "32", "--model-n-head", "2",
                       "--model-block-size", "16", "--logging-progress-bar", "false",
                       "--logging-log-dir", str(tmp_path / "run"), *flags]) == 0
    return tmp_path / "run"


def assert_same_logits(run_dir, out, ids):
    transformers = pytest.importorskip("transformers")
    ours, _, _ = load_lm(run_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx), rtol=0, atol=1e-5)
    return theirs


def test_export_hf_loads_in_transformers_with_the_same_logits_and_tokenizer(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    run_dir = train_lm(tmp_path, *GPT2_FLAGS, "--model-bias", "true", "--model-dropout", "0.1",
                           "--data-tokenizer", "bpe", "--data-vocab-size", "300")
    out = tmp_path / "hf"
    capsys.readouterr()
    assert main(["--checkpoint", str(run_dir), "--format", "hf", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "GPT2LMHeadModel" in printed and "tokenizer.json" in printed
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]
    _, tokenizer, ckpt = load_lm(run_dir)
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads((ckpt / "tokenizer.json").read_text())
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "the lazy fox jumps over 12 quick dogs"
    ids = tokenizer.encode(text)
    assert hf_tokenizer(text)["input_ids"] == ids and len(hf_tokenizer) == tokenizer.vocab_size
    model = assert_same_logits(run_dir, out, ids)
    config = json.loads((out / "config.json").read_text())
    assert config["n_positions"] == 16 and config["vocab_size"] == tokenizer.vocab_size
    assert config["activation_function"] == "gelu" and config["resid_pdrop"] == 0.1
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied


def test_export_hf_tokenizer_adds_no_special_tokens_training_did_not(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    # a tokenizer file whose post-processor puts <s> first, as Llama's and BERT's do; training encodes without it
    made = Tokenizer(models.BPE())
    made.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    made.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20,
                             trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"],
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    made.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    made.save(str(tmp_path / "tokenizer.json"))
    run_dir = train_lm(tmp_path, *GPT2_FLAGS, "--data-tokenizer", str(tmp_path / "tokenizer.json"))
    out = tmp_path / "hf"
    assert main(["--checkpoint", str(run_dir), "--format", "hf", "--out", str(out)]) == 0

    _, tokenizer, _ = load_lm(run_dir)
    text = "the lazy dog jumps"
    ids = tokenizer.encode(text)
    assert ids[0] != 0 and transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"] == ids
    assert_same_logits(run_dir, out, ids)


def test_export_hf_cuts_a_padded_vocabulary_back_to_the_tokenizers(tmp_path):
    transformers = pytest.importorskip("transformers")
    run_dir = train_lm(tmp_path, *GPT2_FLAGS, "--model-vocab-size", "64")
    out = tmp_path / "hf"
    assert main(["--checkpoint", str(run_dir), "--format", "hf", "--out", str(out)]) == 0
    ours, tokenizer, _ = load_lm(run_dir)
    vocab = tokenizer.vocab_size
    assert ours.config.vocab_size == 64 > vocab
    assert json.loads((out / "config.json").read_text())["vocab_size"] == vocab
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.tensor([[1, 5, 2, 7, 3, 0, 4]])
    with torch.no_grad():  # the same logits for every token there is, and none for the padding
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[..., :vocab], rtol=0, atol=1e-5)


def test_export_hf_without_biases_writes_zero_biases(tmp_path, capsys):
    pytest.importorskip("transformers")
    run_dir = train_lm(tmp_path, *GPT2_FLAGS, "--model-tie-embeddings", "false")  # bias false by default
    out = tmp_path / "hf"
    for _ in range(2):  # the second replaces the first export: its model.safetensors carries the mark
        assert main(["--checkpoint", str(run_dir), "--format", "hf", "--out", str(out)]) == 0  # in-process: transformers is loaded
    assert "no tokenizer" in capsys.readouterr().out  # char: no Hugging Face form
    # nor does that mark let the plain export write its own tensor names over the folder's weights
    assert main(["--checkpoint", str(run_dir), "--out", str(out / "model.safetensors")]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    weights = load_file(out / "model.safetensors")
    biases = [t for name, t in weights.items() if name.endswith(".bias")]
    assert len(biases) == 2 * 6 + 1 and all(torch.equal(t, torch.zeros_like(t)) for t in biases)
    assert not torch.equal(weights["lm_head.weight"], weights["transformer.wte.weight"])  # untied
    model = assert_same_logits(run_dir, out, [1, 5, 2, 7, 3, 0, 4])
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()


def test_export_hf_files_follow_the_umask(tmp_path, umask_002):
    pytest.importorskip("transformers")
    config = lm_config(tmp_path, model={"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu"})
    TrainingEngine(config, LMTask(config), 0, 1).train()
    out = tmp_path / "hf"
    assert main(["--checkpoint", str(tmp_path / "run"), "--format", "hf", "--out", str(out)]) == 0
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()}
    assert modes == {"config.json": oct(0o664), "model.safetensors": oct(0o664)}


def test_export_hf_of_a_default_model_is_a_llama_with_the_same_logits_and_tokenizer(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    run_dir = train_lm(tmp_path, "--model-bias", "true", "--data-tokenizer", "bpe", "--data-vocab-size", "300",
                       "--model-vocab-size", "320")  # rope, rmsnorm, swiglu; a padded vocabulary
    out = tmp_path / "hf"
    capsys.readouterr()
    assert main(["--checkpoint", str(run_dir), "--format", "hf", "--out", str(out)]) == 0
    assert "as a transformers LlamaForCausalLM (config.json, model.safetensors; tokenizer.json)" in capsys.readouterr().out
    ours, tokenizer, _ = load_lm(run_dir)
    vocab = tokenizer.vocab_size
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == vocab < ours.config.vocab_size
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "the lazy fox jumps over 12 quick dogs"
    ids = tokenizer.encode(text)
    assert hf_tokenizer(text)["input_ids"] == ids  # no <s> of Llama's own tokenizer class
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()  # tied
    with torch.no_grad():
        torch.testing.assert_close(theirs(torch.tensor([ids])).logits, ours(torch.tensor([ids]))[..., :vocab],
                                   rtol=0, atol=1e-5)


def test_export_hf_of_grouped_queries_and_other_widths_is_a_llama_of_them_with_the_same_logits(tmp_path, capsys):
    run_dir = train_lm(tmp_path, "--model-n-kv-head", "1", "--model-mlp-hidden", "48", "--model-rope-base",
                       "500000", "--model-norm-eps", "1e-6", "--model-rope-scaling", "8")
    out = tmp_path / "hf"
    assert main(["--checkpoint", str(run_dir), "--format", "hf", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (2, 1, 48)
    rope = config.get("rope_parameters") or config  # transformers 5 keeps the base there
    assert (rope["rope_theta"], config["rms_norm_eps"], rope["rope_type"], rope["factor"]) == \
        (500000.0, 1e-6, "llama3", 8.0)
    assert_same_logits(run_dir, out, load_lm(run_dir)[1].encode("the lazy fox"))


def test_export_hf_of_biases_in_the_query_key_and_value_alone_is_a_qwen2_with_the_same_logits(tmp_path, capsys):
    run_dir = train_lm(tmp_path, "--model-qkv-bias", "true", "--model-n-kv-head", "1")
    out = tmp_path / "hf"
    assert main(["--checkpoint", str(run_dir), "--format", "hf", "--out", str(out)]) == 0
    assert "as a transformers Qwen2ForCausalLM" in capsys.readouterr().out
    assert_same_logits(run_dir, out, load_lm(run_dir)[1].encode("the lazy fox"))


def test_export_hf_of_a_mix_no_architecture_has_exits_2_naming_every_setting(tmp_path, capsys):
    pytest.importorskip("transformers")
    config = lm_config(tmp_path, model={"norm": "layernorm", "mlp": "gelu"})  # with rope: neither GPT-2 nor Llama
    TrainingEngine(config, LMTask(config), 0, 1).train()
    out = tmp_path / "hf"
    assert main(["--checkpoint", str(tmp_path / "run"), "--format", "hf", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        "error: --format hf: model.pos_emb rope has no GPT-2 form, and the model no other Hugging Face one; train "
        "with --model-pos-emb learned to export a GPT-2 (or with --model-norm rmsnorm --model-mlp swiglu for a "
        "Llama; with --model-norm rmsnorm --model-mlp swiglu --model-qk-norm True for a Qwen3)\n")
    assert not out.exists()


def test_a_refused_export_names_the_architecture_each_retrain_would_export():
    from llm.export import _no_hf_form
    from llm.models.gpt import GPTConfig
    from llm.models.hf import NoHFForm, hf_architecture

    # normed queries and keys with query, key and value biases: without the norms, a Qwen2; without the biases, a Qwen3
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=4, n_embd=32, qk_norm=True, qkv_bias=True)
    with pytest.raises(NoHFForm) as e:
        hf_architecture(config)
    said = _no_hf_form(config, e.value)
    assert said.startswith("model.qk_norm True has no Qwen2 form") and "--model-qk-norm False to export a Qwen2" in said
    assert "with --model-qkv-bias False for a Qwen3" in said
    assert hf_architecture(dataclasses.replace(config, qk_norm=False)) == "Qwen2ForCausalLM"
    assert hf_architecture(dataclasses.replace(config, qkv_bias=False)) == "Qwen3ForCausalLM"


def test_export_hf_without_transformers_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    # checked before the checkpoint is read, so a missing one is not reached
    assert main(["--checkpoint", str(tmp_path / "nope"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == "error: --format hf needs the transformers package: pip install transformers\n"


def test_an_export_stopped_among_its_renames_can_be_made_again(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    run_dir = train_lm(tmp_path)
    replace, renamed = os.replace, []

    def stopped_after_the_first(src, dst):
        if renamed:
            raise KeyboardInterrupt
        renamed.append(os.path.basename(dst))
        replace(src, dst)

    for flags, out in ((["--format", "hf"], tmp_path / "hf"), ([], tmp_path / "model.safetensors")):
        renamed.clear()
        monkeypatch.setattr(os, "replace", stopped_after_the_first)
        assert main(["--checkpoint", str(run_dir), *flags, "--out", str(out)]) == 130
        monkeypatch.setattr(os, "replace", replace)
        assert renamed == [out.name if not flags else "model.safetensors"]  # the weights, which mark an export
        capsys.readouterr()
        assert main(["--checkpoint", str(run_dir), *flags, "--out", str(out)]) == 0, capsys.readouterr().err


def test_export_hf_leaves_a_folder_of_other_files_alone(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["--checkpoint", str(tmp_path / "nope"), "--format", "hf", "--out", str(out)]) == 2
    assert "holds files --format hf does not write (notes.txt)" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    theirs = tmp_path / "bert"  # the names an export writes, of another model: not replaced either
    theirs.mkdir()
    (theirs / "config.json").write_text('{"model_type": "bert"}')
    assert main(["--checkpoint", str(tmp_path / "nope"), "--format", "hf", "--out", str(theirs)]) == 2
    assert "holds config.json of another model" in capsys.readouterr().err
    assert (theirs / "config.json").read_text() == '{"model_type": "bert"}'


@pytest.mark.parametrize("fmt", ["safetensors", "hf"])
def test_an_export_killed_as_safetensors_writes_is_made_again_and_leaves_nothing_of_the_killed_one(tmp_path, fmt,
                                                                                                   capsys):
    if fmt == "hf":
        pytest.importorskip("transformers")
    run_dir = train_lm(tmp_path)
    out = tmp_path / "exports" / ("hf" if fmt == "hf" else "model.safetensors")
    flags = ["--checkpoint", str(run_dir), "--format", fmt, "--out", str(out)]
    # save_file writes a temporary file beside the path it is given, then renames it; the kill falls in between
    killed = ("import os, signal, sys; from pathlib import Path; from llm import export\n"
              "def killed(tensors, filename, metadata=None):\n"
              "    Path(filename).with_name('.tmpK1lled').write_bytes(b'half of the weights')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              "export.save_file = killed\n"
              "export.main(sys.argv[1:])\n")
    assert run([sys.executable, "-c", killed, *flags], cwd=tmp_path).returncode == -9
    assert main(flags) == 0, capsys.readouterr().err
    written = sorted(str(p.relative_to(out.parent)) for p in out.parent.rglob("*"))
    assert written == (["hf", "hf/config.json", "hf/model.safetensors"] if fmt == "hf" else
                       ["model.json", "model.safetensors", "model.tokenizer.json"])


def test_a_disk_full_as_safetensors_writes_is_one_line_and_leaves_the_earlier_export_whole(tmp_path, monkeypatch,
                                                                                             capsys):
    config = tiny_config(tmp_path)
    TrainingEngine(config, RegressionTask(config), 0, 1).train()
    out = tmp_path / "exports" / "model.safetensors"
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}

    def disk_full(tensors, filename, metadata=None):  # as safetensors reports an error of its own write
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(export, "save_file", disk_full)
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: cannot write {out}: No space left on device\n"
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before  # nothing left of the failed one
