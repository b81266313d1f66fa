"""python -m llm.evaluate and evaluate(): loss over every token of a file, one-line errors with exit 2."""

import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llm.data.synthetic_data_module import SyntheticDataModule
from llm.data.text_data_module import TextDataModule
from llm.evaluate import evaluate, main, score_split
from llm.training.core.config import Config
from llm.training.tasks.regression_task import RegressionTask
from llm.training.tasks.lm_task import load_lm, perplexity
from tests.helpers import run, train_tiny_lm, wordpiece_file

TEXT = "".join(f"{w} sat on the mat. " for w in ("the cat", "a dog", "my hat", "one bat") * 60)
BLOCK = 32
HELD_OUT = "a bat sat on my mat. the dog ate one hat. " * 7  # 294 chars: 9 windows of 32 and a tail


@pytest.fixture(scope="module")
def step_dir(tmp_path_factory) -> Path:
    """The checkpoint of a tiny char-level GPT, trained once for the whole module."""
    root = tmp_path_factory.mktemp("lm")
    return train_tiny_lm(root, TEXT, BLOCK) / "checkpoints" / "step_00000030"


@pytest.fixture(scope="module")
def loaded(step_dir):
    model, tokenizer, _ = load_lm(step_dir)
    return model, tokenizer


def window_by_window(model, ids: list[int], block: int = BLOCK) -> float:
    """The mean loss written out plainly: each window of ``block`` targets on its own, no batching."""
    total = 0.0
    for start in range(0, len(ids) - 1, block):
        chunk = torch.tensor(ids[start:start + block + 1])
        with torch.no_grad():
            logits = model(chunk[None, :-1])[0]
        total += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
    return total / (len(ids) - 1)


# ---- evaluate() ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 20, BLOCK + 1, 3 * BLOCK + 1, 3 * BLOCK + 2, 5 * BLOCK + 17])
@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_the_mean_covers_every_token_once_however_it_is_batched(loaded, n, batch_size):
    model, tokenizer = loaded
    ids = tokenizer.encode(HELD_OUT * 2)[:n]
    loss, n_tokens = evaluate(model, ids, BLOCK, batch_size)
    assert n_tokens == n - 1
    assert loss == pytest.approx(window_by_window(model, ids), abs=1e-5)


class Uniform(nn.Module):
    """Equal logits over V tokens; records the length of every sequence it is given."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.lengths = vocab, []
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        self.lengths += [idx.size(1)] * idx.size(0)
        return torch.zeros(*idx.shape, self.vocab)


def test_uniform_predictions_score_log_vocab_on_windows_of_at_most_block_size():
    model = Uniform(vocab=7)
    model.train()
    loss, n_tokens = evaluate(model, torch.arange(100) % 7, block_size=8, batch_size=5)
    assert loss == pytest.approx(math.log(7), abs=1e-6) and n_tokens == 99
    assert model.lengths == [8] * 12 + [3]  # 12 full windows, then the 3 targets left over
    assert model.training  # the caller's mode is restored


def test_on_the_validation_split_it_agrees_with_training(step_dir, loaded, monkeypatch):
    """Training's val_loss (in the manifest) scored the same windows with the same weights."""
    model, _ = loaded
    monkeypatch.chdir(step_dir.parents[2])  # the run was started there, with relative data paths
    config = Config.from_yaml(step_dir / "config.yaml")
    data = TextDataModule(config)
    data.prepare_data()
    data.setup()
    assert data.cache_hit
    val = data.val_set.tokens
    full = (len(val) - 1) // BLOCK * BLOCK + 1  # validation during training skips the tail
    loss, _ = evaluate(model, val[:full], BLOCK, batch_size=3)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    assert loss == pytest.approx(manifest["metrics"]["val_loss"], abs=1e-5)


def test_bad_arguments_raise_value_error(loaded):
    model, _ = loaded
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate(model, [3], BLOCK)
    with pytest.raises(ValueError, match="block_size and batch_size must be >= 1"):
        evaluate(model, [3, 4], BLOCK, batch_size=0)


# ---- the command line ----------------------------------------------------------------------


def evaluate_cli(*flags: str, cwd: Path):
    return run([sys.executable, "-m", "llm.evaluate", *flags], cwd=cwd, timeout=60)


def test_prints_loss_perplexity_and_tokens_of_the_whole_file(step_dir, loaded, tmp_path):
    model, tokenizer = loaded
    (tmp_path / "held_out.txt").write_text(HELD_OUT)
    out = evaluate_cli("--checkpoint", str(step_dir.parent.parent), "--data-path", "held_out.txt",
                       "--batch-size", "4", cwd=tmp_path)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    found = re.fullmatch(r"loss (\S+)  ppl (\S+)  tokens (\d+)  checkpoint (\S+)\n", out.stdout)
    assert found, out.stdout
    loss, ppl, tokens, ckpt = float(found[1]), float(found[2]), int(found[3]), Path(found[4])
    expected = window_by_window(model, tokenizer.encode(HELD_OUT))
    assert loss == pytest.approx(expected, abs=1e-4)
    assert ppl == pytest.approx(math.exp(expected), rel=1e-3)
    assert tokens == len(HELD_OUT) - 1 and ckpt == step_dir
    assert loss < math.log(tokenizer.vocab_size) - 0.2  # trained weights: an untrained model scores about log V


def test_a_corrupt_newest_checkpoint_is_skipped_with_a_one_line_warning(step_dir, tmp_path):
    older, newest = tmp_path / "checkpoints" / "step_00000010", tmp_path / "checkpoints" / "step_00000030"
    shutil.copytree(step_dir, older)
    shutil.copytree(step_dir, newest)
    state = bytearray((newest / "state.pt").read_bytes())
    state[len(state) // 2] ^= 0xFF
    (newest / "state.pt").write_bytes(bytes(state))
    (tmp_path / "held_out.txt").write_text(HELD_OUT)
    out = evaluate_cli("--checkpoint", str(tmp_path), "--data-path", "held_out.txt", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stderr == f"warning: skipping checkpoint {newest}: state.pt does not match its sha256 checksum\n"
    assert out.stdout.rstrip("\n").endswith(f"checkpoint {older}")


@pytest.mark.parametrize("data, flags, message", [
    (None, ["--data-path", "missing.txt"],
     "error: --data-path: missing.txt does not exist (expected a text file, a folder or a glob)"),
    ("", [], "error: --data-path: data.txt is empty"),
    ("the cat", ["--checkpoint", "nope"], "error: checkpoint path nope does not exist"),
    # an unset shell variable, not training's default corpus (the standard library's sources) scored instead
    ("the cat", ["--data-path", ""], "error: --data-path: got an empty path; give a text file, a folder or a glob"),
    ("the cat", ["--block-size", str(BLOCK + 1)],
     f"error: --block-size: got {BLOCK + 1}, more than the model's block_size {BLOCK}, the most it was built to see"),
    ("the cat", ["--block-size", "0"], "error: --block-size: got 0, expected an integer >= 1"),
])
def test_bad_input_exits_2_with_one_line_and_no_traceback(step_dir, tmp_path, monkeypatch, capsys, data, flags, message):
    monkeypatch.chdir(tmp_path)
    if data is not None:
        (tmp_path / "data.txt").write_text(data)
    given = {"--checkpoint": str(step_dir), "--data-path": "data.txt", **dict(zip(flags[::2], flags[1::2]))}
    assert main([x for pair in given.items() for x in pair]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == message + "\n"


@pytest.mark.parametrize("content, message", [
    (b"t", "--data-path: {path} holds 1 token; at least 2 are needed to score a prediction"),
    (b"the Zebra", "--data-path: {path}: character 'Z' is not in the char tokenizer's vocabulary of 15"),
    (b"the \xff cat", "--data-path: {path} is not UTF-8 text (byte 4); convert or remove it"),
    (None, "--data-path: the folder {path} holds no files"),
])
def test_unusable_data_exits_2_with_one_line(step_dir, tmp_path, capsys, content, message):
    path = tmp_path / "data.txt"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    assert main(["--checkpoint", str(step_dir), "--data-path", str(path)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == "error: " + message.format(path=path) + "\n"


def test_a_folder_is_scored_as_its_files_read_as_a_corpus_with_the_runs_separator(tmp_path, capsys):
    from llm.evaluate import read_tokens
    from llm.training import train

    texts = tmp_path / "texts"
    texts.mkdir()
    for name in ("b.txt", "a.txt"):
        (texts / name).write_text(f"{name} {TEXT}")
    assert train.main(["--task", "lm", "--training-max-steps", "2", "--training-batch-size", "4", "--model-n-layer",
                       "1", "--model-n-embd", "16", "--model-n-head", "2", "--model-block-size", str(BLOCK),
                       "--data-path", str(texts), "--data-separator", "|", "--data-cache-dir", str(tmp_path / "c"),
                       "--logging-log-dir", str(tmp_path / "lm"), "--logging-progress-bar", "false"]) == 0
    model, tokenizer, _ = load_lm(tmp_path / "lm")
    joined = np.asarray(tokenizer.encode(f"a.txt {TEXT}|b.txt {TEXT}"))  # sorted, the separator between them
    assert read_tokens(texts, tokenizer, "|").tolist() == joined.tolist()
    capsys.readouterr()
    for given in (texts, texts / "*.txt"):
        assert main(["--checkpoint", str(tmp_path / "lm"), "--data-path", str(given)]) == 0
        loss, n = evaluate(model, joined, BLOCK, 8)
        assert capsys.readouterr().out.startswith(f"loss {loss:.4f}  ppl {perplexity(loss):.3f}  tokens {n}  ")


def test_windows_shorter_than_the_models_score_each_token_from_the_tokens_before_it_in_its_window(
        step_dir, loaded, tmp_path, capsys):
    model, tokenizer = loaded
    (tmp_path / "held_out.txt").write_text(HELD_OUT)
    ids = tokenizer.encode(HELD_OUT)
    assert main(["--checkpoint", str(step_dir), "--data-path", str(tmp_path / "held_out.txt"), "--block-size", "8",
                 "--batch-size", "3"]) == 0
    found = re.match(r"loss (\S+)  ppl \S+  tokens (\d+)  ", capsys.readouterr().out)
    assert float(found[1]) == pytest.approx(window_by_window(model, ids, 8), abs=1e-4)
    assert float(found[1]) != pytest.approx(window_by_window(model, ids), abs=1e-3)  # not the model's windows
    assert int(found[2]) == len(ids) - 1
    assert main(["--checkpoint", str(step_dir), "--block-size", "8"]) == 2  # a split: its data module's samples
    assert "--block-size sets the windows of a text file's tokens (--data-path)" in capsys.readouterr().err


def test_a_batch_size_below_1_exits_2(step_dir, capsys):
    assert main(["--checkpoint", str(step_dir), "--data-path", "x", "--batch-size", "0"]) == 2
    assert capsys.readouterr().err == "error: --batch-size: got 0, expected an integer >= 1\n"


def test_text_the_tokenizer_does_not_cover_is_scored_with_a_warning_of_its_share(tmp_path, capsys):
    tokenizer = wordpiece_file(tmp_path / "tokenizer.json", TEXT)
    run_dir = train_tiny_lm(tmp_path, TEXT, BLOCK, steps=2, flags=("--data-tokenizer", str(tokenizer)))
    (tmp_path / "other.txt").write_text("the cat ate the rat. " * 10)  # "ate" and "rat." are no words of TEXT
    capsys.readouterr()
    share = re.escape(f"--data-path: 20 of the 50 tokens of {tmp_path / 'other.txt'} (40.00%) are the unknown token")
    with pytest.warns(UserWarning, match=share):
        assert main(["--checkpoint", str(run_dir), "--data-path", str(tmp_path / "other.txt")]) == 0
    assert capsys.readouterr().out.startswith("loss ")


# ---- any task, on a split of the data it trained on -----------------------------------------------


def train_task(root: Path, *flags: str) -> Path:
    """A small run of a built-in task through the command line's main(), validated and saved at its end."""
    from llm.training import train

    assert train.main(["--training-max-steps", "12", "--model-n-layer", "1", "--model-n-embd", "16",
                       "--data-num-samples", "300", "--data-input-dim", "4", "--logging-progress-bar", "false",
                       "--logging-log-dir", str(root / "run"), *flags]) == 0
    return root / "run"


def last_validation(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "val"][-1]


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_a_checkpoint_of_any_task_scores_the_validation_split_as_training_did(tmp_path, capsys, task):
    run_dir = train_task(tmp_path, "--task", task)
    capsys.readouterr()
    assert main(["--checkpoint", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    record = last_validation(run_dir)
    metrics = {key: value for key, value in record.items() if key.startswith("val_")}
    assert printed.startswith(f"val_loss {record['val_loss']:.6g}  ") and f"samples 30  checkpoint {run_dir}" in printed
    assert score_split(run_dir)[:2] == (pytest.approx(metrics, rel=1e-12), 30)  # the whole split: 10% of 300


@pytest.mark.parametrize("task, metrics", [("regression", {"test_mae"}), ("classification", {"test_acc", "test_f1"})])
def test_the_test_split_of_the_built_in_data_is_held_out_and_as_large_as_validation(tmp_path, task, metrics):
    run_dir = train_task(tmp_path, "--task", task, "--checkpoint-keep-best", "0")
    test, samples, ckpt = score_split(run_dir / "checkpoints" / "latest", "test", batch_size=7)
    val, _, _ = score_split(run_dir, "val")
    assert samples == 30 and ckpt == run_dir / "checkpoints" / "step_00000012"
    assert set(test) == {"test_loss", *metrics} and test["test_loss"] != val["val_loss"]  # other samples
    assert math.isfinite(test["test_loss"])


@pytest.mark.parametrize("held_out", [False, True])
def test_a_language_model_scores_its_validation_split_from_any_folder(tmp_path, monkeypatch, capsys, held_out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text(TEXT)
    (tmp_path / "held.txt").write_text(TEXT[: len(TEXT) // 3])
    from llm.training import train

    more = ["--data-val-path", "held.txt"] if held_out else []
    assert train.main(["--task", "lm", "--training-max-steps", "6", "--training-batch-size", "8", "--model-n-layer",
                       "1", "--model-n-embd", "32", "--model-n-head", "2", "--model-block-size", str(BLOCK),
                       "--data-path", "corpus.txt", "--data-cache-dir", "cache", "--logging-log-dir", "lm",
                       "--logging-progress-bar", "false", *more]) == 0
    record = last_validation(tmp_path / "lm")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "held.txt").write_text(TEXT[len(TEXT) // 2:])  # another held.txt, which must not be read
    monkeypatch.chdir(elsewhere)  # the relative corpus and cache are found from the folder the run started in
    metrics, samples, _ = score_split("../lm")
    assert metrics == pytest.approx({"val_loss": record["val_loss"], "val_ppl": record["val_ppl"]}, rel=1e-12)
    capsys.readouterr()
    assert main(["--checkpoint", "../lm", "--split", "test"]) == 2  # a text file has no test split
    assert capsys.readouterr().err == ("error: TextDataModule has no test split: define test_dataloader(rank, "
                                       "world_size) (built in setup(\"test\")), or score the validation split with "
                                       "--split val\n")
    (tmp_path / "corpus.txt").write_text(TEXT[::-1])  # edited, with the same characters: another split
    assert main(["--checkpoint", "../lm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.path ../corpus.txt is not the corpus ") and err.count("\n") == 1
    assert "was trained on (edited since, or another), so its val split is not the run's: score a text file" in err
    (tmp_path / "corpus.txt").write_text(TEXT + "Zebra")  # another char vocabulary: the ids would mean otherwise
    assert main(["--checkpoint", "../lm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the data here gives the model otherwise than ") and "(tokenizer.json)" in err


def test_relative_data_of_a_run_whose_log_dir_does_not_place_it_is_refused_saying_where_to_run(tmp_path, monkeypatch,
                                                                                                 capsys):
    started = tmp_path / "project" / "sub"
    started.mkdir(parents=True)
    monkeypatch.chdir(started)
    (tmp_path / "project" / "corpus.txt").write_text(TEXT)
    from llm.training import train

    assert train.main(["--task", "lm", "--training-max-steps", "2", "--training-batch-size", "8", "--model-n-layer",
                       "1", "--model-n-embd", "32", "--model-n-head", "2", "--model-block-size", str(BLOCK),
                       "--data-path", "../corpus.txt", "--data-cache-dir", str(tmp_path / "cache"),
                       "--logging-log-dir", "../runs/lm", "--logging-progress-bar", "false"]) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["--checkpoint", "project/runs/lm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.path: ../corpus.txt does not exist") and err.endswith(
        "the run's data.path is relative to the folder it was started in, which its log_dir (../runs/lm) does not "
        "tell: run this from that folder\n")
    monkeypatch.chdir(started)
    assert main(["--checkpoint", "../runs/lm"]) == 0


def test_a_split_and_a_text_file_are_not_scored_at_once(step_dir, capsys):
    assert main(["--checkpoint", str(step_dir), "--data-path", "x.txt", "--split", "val"]) == 2
    assert capsys.readouterr().err == ("error: --split scores a split of the run's data module, --data-path a text "
                                       "file: give one of them\n")


def test_items_drawn_at_random_in_loader_workers_are_drawn_as_training_validated_them(tmp_path):
    # each validation batch's draws come from a seed of its own, which the tool gives them too
    run_dir = train_task(tmp_path, "--data-module", "tests.helpers:AugmentedData", "--data-num-workers", "2")
    metrics, _, _ = score_split(run_dir)
    assert metrics == pytest.approx({k: v for k, v in last_validation(run_dir).items() if k.startswith("val_")},
                                    rel=1e-12)


def test_a_loader_method_that_returns_no_pair_is_one_line(tmp_path, capsys):
    run_dir = train_task(tmp_path, "--data-module", "tests.test_evaluate:BareTestLoader")
    capsys.readouterr()
    assert main(["--checkpoint", str(run_dir), "--split", "test"]) == 2
    assert capsys.readouterr().err.startswith("error: BareTestLoader.test_dataloader() returned DataLoader, expected "
                                              "a (DataLoader, DistributedSampler) pair")


class BareTestLoader(SyntheticDataModule):
    def test_dataloader(self, rank, world_size):
        return self.build_dataloader(self.test_set, rank, world_size, train=False)[0]


def test_a_split_whose_items_all_weigh_nothing_scores_nan_as_validation_does(tmp_path):
    run_dir = train_task(tmp_path, "--task", "tests.test_evaluate:WeightlessTask")
    metrics, samples, _ = score_split(run_dir)
    assert samples == 30 and set(metrics) == {"val_loss", "val_mae"}
    assert all(math.isnan(value) for value in metrics.values()), metrics
    assert last_validation(run_dir)["val_loss"] is None  # logged as null: NaN in JSON


class WeightlessTask(RegressionTask):
    def loss_weight(self, batch):
        return torch.tensor(0.0)
