"""python -m llm.generate as users run it: streamed, seeded text; one-line errors with exit 2."""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from llm.data.tokenizers import ByteTokenizer, CharTokenizer, HFTokenizer, load_tokenizer
from llm.generate import SAMPLE_SEPARATOR, main, stream_text
from llm.training.tasks.lm_task import load_lm
from tests.helpers import cli_env, reseal, run, train_tiny_lm, wordpiece_file

TEXT = "".join(f"{w} sat on the mat. " for w in ("the cat", "a dog", "my hat", "one bat") * 60)
BLOCK = 32
PROMPT = "the cat sat"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run of a tiny char-level GPT, trained once for the whole module."""
    root = tmp_path_factory.mktemp("lm")
    return train_tiny_lm(root, TEXT, BLOCK)


@pytest.fixture(scope="module")
def step_dir(run_dir) -> Path:
    return run_dir / "checkpoints" / "step_00000030"


def generate(*flags: str, cwd: Path):
    return run([sys.executable, "-m", "llm.generate", *flags], cwd=cwd, timeout=60)


def continuation(stdout: str, prompt: str = PROMPT) -> str:
    assert stdout.startswith(prompt) and stdout.endswith("\n"), stdout
    return stdout[len(prompt):-1]


# ---- the happy path, as a subprocess -------------------------------------------------------


def test_prints_the_prompt_then_exactly_n_tokens_and_the_seed_fixes_the_text(run_dir, step_dir, tmp_path, capsys):
    tokenizer = load_tokenizer(step_dir / "tokenizer.json")
    common = ["--prompt", PROMPT, "--max-new-tokens", "40", "--temperature", "1.0"]
    out = generate("--checkpoint", str(run_dir), *common, "--seed", "1", cwd=tmp_path)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    texts = [out.stdout]
    # then in this process, which has drawn other random numbers before: the seed alone fixes the text
    for flags in (["--checkpoint", str(step_dir), "--seed", "1"],
                  ["--checkpoint", str(run_dir), "--seed", "2", "--top-k", "5"]):
        assert main([*common, *flags]) == 0
        out = capsys.readouterr()
        assert out.err == ""
        texts.append(out.out)
    first, again, other = texts
    assert all(len(tokenizer.encode(continuation(text))) == 40 for text in texts)
    assert first == again  # a run folder and its checkpoint are the same model
    assert first != other  # 40 tokens sampled at temperature 1: equal only by a fluke


def test_num_samples_prints_texts_apart_the_first_as_one_sample_gives_it(step_dir, capsys):
    common = ["--checkpoint", str(step_dir), "--prompt", PROMPT, "--max-new-tokens", "20", "--seed", "3"]
    assert main(common) == 0
    one = capsys.readouterr().out
    assert main([*common, "--num-samples", "3"]) == 0
    texts = capsys.readouterr().out.split(SAMPLE_SEPARATOR)
    assert len(texts) == 3 and texts[0] == one
    tokenizer = load_tokenizer(step_dir / "tokenizer.json")
    assert all(len(tokenizer.encode(continuation(text))) == 20 for text in texts)
    assert len(set(texts)) == 3  # the generator goes on: not the same text again
    assert main([*common, "--num-samples", "2", "--stop", "t"]) == 0  # each text ends before its own first "t"
    stopped = capsys.readouterr().out.split(SAMPLE_SEPARATOR)
    assert len(stopped) == 2 and all("t" not in continuation(text) for text in stopped)


# ---- what is generated, in-process ----------------------------------------------------------


def greedy(model, tokenizer, prompt: str, n: int) -> str:
    ids = tokenizer.encode(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids[-BLOCK:]]))[0, -1].argmax()))
    return tokenizer.decode(ids[len(tokenizer.encode(prompt)):])


def test_text_reaches_the_reader_piece_by_piece(step_dir, tmp_path):
    # unflushed, a pipe's reader gets nothing until 8 KiB of text have piled up in the writer's buffer
    env = {k: v for k, v in cli_env().items() if k != "PYTHONUNBUFFERED"}  # the program's own flushing, not -u's
    proc = subprocess.Popen([sys.executable, "-m", "llm.generate", "--checkpoint", str(step_dir), "--prompt", PROMPT,
                             "--max-new-tokens", "1000000", "--seed", "1"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = os.read(proc.stdout.fileno(), 1 << 16)  # whatever the pipe holds when the first write lands
        assert 0 < len(first) < 1024, (len(first), proc.stderr.read().decode()[-2000:] if not first else "")
        received = first
        while len(received) < len(PROMPT) + 20:
            more = os.read(proc.stdout.fileno(), 1 << 16)
            assert more, proc.stderr.read().decode()[-2000:]  # the process ended early
            received += more
        assert received.decode().startswith(PROMPT)
    finally:
        proc.kill()
        proc.wait()


def test_temperature_zero_continues_with_the_most_likely_tokens(step_dir, capsys):
    model, tokenizer, _ = load_lm(step_dir)
    assert main(["--checkpoint", str(step_dir), "--prompt", PROMPT, "--max-new-tokens", "20",
                 "--temperature", "0"]) == 0
    assert continuation(capsys.readouterr().out) == greedy(model, tokenizer, PROMPT, 20)
    # a nucleus so small that it holds only the most likely token: the same text, at any temperature
    assert main(["--checkpoint", str(step_dir), "--prompt", PROMPT, "--max-new-tokens", "20",
                 "--temperature", "5", "--top-p", "1e-6"]) == 0
    assert continuation(capsys.readouterr().out) == greedy(model, tokenizer, PROMPT, 20)
    # and one that float32 rounds to 0 (below 1.4e-45) still keeps that token
    assert main(["--checkpoint", str(step_dir), "--prompt", PROMPT, "--max-new-tokens", "20", "--top-p", "1e-50"]) == 0
    assert continuation(capsys.readouterr().out) == greedy(model, tokenizer, PROMPT, 20)


def test_a_prompt_longer_than_the_context_is_cropped_to_its_end(step_dir, capsys):
    model, tokenizer, _ = load_lm(step_dir)
    prompt = "one bat sat on the mat. " * 5 + "a dog"  # 125 chars, context 32
    assert main(["--checkpoint", str(step_dir), "--prompt", prompt, "--max-new-tokens", "10",
                 "--temperature", "0"]) == 0
    assert continuation(capsys.readouterr().out, prompt) == greedy(model, tokenizer, prompt, 10)


def test_a_padded_vocabulary_trains_loads_and_samples_only_the_tokenizers_tokens(tmp_path, capsys):
    # two steps: the 230-odd padded ids still hold most of the probability, so sampling them is all but certain
    run_dir = train_tiny_lm(tmp_path, TEXT, BLOCK, steps=2, flags=("--model-vocab-size", "256"))
    model, tokenizer, _ = load_lm(run_dir)
    assert model.config.vocab_size == 256 and tokenizer.vocab_size < 30
    capsys.readouterr()
    assert main(["--checkpoint", str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "100", "--seed", "0"]) == 0
    assert len(continuation(capsys.readouterr().out)) == 100  # one character per token


def test_a_prompt_the_tokenizer_does_not_cover_is_continued_with_a_warning(tmp_path, capsys):
    tokenizer = wordpiece_file(tmp_path / "tokenizer.json", TEXT)
    run_dir = train_tiny_lm(tmp_path, TEXT, BLOCK, steps=2, flags=("--data-tokenizer", str(tokenizer)))
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"^--prompt: 1 of its 3 tokens are the unknown token"):
        assert main(["--checkpoint", str(run_dir), "--prompt", "the zebra sat", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("the zebra sat")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt it covers: no warning
        assert main(["--checkpoint", str(run_dir), "--prompt", "the cat sat", "--max-new-tokens", "3"]) == 0


def test_zero_new_tokens_prints_just_the_prompt(step_dir, capsys):
    assert main(["--checkpoint", str(step_dir), "--prompt", PROMPT, "--max-new-tokens", "0"]) == 0
    assert capsys.readouterr().out == PROMPT + "\n"


def test_ctrl_c_ends_the_text_so_far_with_one_line_and_exit_130(step_dir, capsys, monkeypatch):
    def stopped(*args, **kwargs):
        yield "To be"
        raise KeyboardInterrupt

    monkeypatch.setattr("llm.generate.stream_text", stopped)
    assert main(["--checkpoint", str(step_dir), "--prompt", PROMPT]) == 130
    out, err = capsys.readouterr()
    assert out == PROMPT + "To be" and err == "\ninterrupted (Ctrl-C): the text so far is all there is\n"

    def loading(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("llm.generate.load_lm", loading)  # before any text
    assert main(["--checkpoint", str(step_dir), "--prompt", PROMPT]) == 130
    assert capsys.readouterr() == ("", "interrupted (Ctrl-C): no text generated\n")


class Scripted(nn.Module):
    """Stands in for GPT: "samples" a fixed list of token ids."""

    def __init__(self, ids: list[int]):
        super().__init__()
        self.ids = ids
        self.weight = nn.Parameter(torch.zeros(1))

    def generate_stream(self, idx, max_new_tokens, temperature, top_k, generator, top_p, vocab):
        yield from self.ids[:max_new_tokens]


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_pieces_of_a_multibyte_character_print_once_it_is_whole(kind):
    text = "naïve café — 日本語 ok"
    tokenizer = ByteTokenizer() if kind == "byte" else HFTokenizer.train_bpe([text * 3], vocab_size=270)
    prompt_ids, ids = tokenizer.encode("x"), tokenizer.encode(text)
    pieces = list(stream_text(Scripted(ids), tokenizer, prompt_ids, len(ids)))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    if kind == "byte":
        assert len(pieces) == len(text)  # one piece per character, however many bytes it takes


def test_a_character_cut_off_by_the_last_token_still_prints():
    ids = list("ok é".encode())[:-1]  # the last token is half of é
    pieces = list(stream_text(Scripted(ids), ByteTokenizer(), [120], len(ids)))
    assert "".join(pieces) == "ok \ufffd"


def test_a_long_stream_decodes_a_bounded_tail_per_token_and_prints_what_a_whole_decode_does(monkeypatch):
    import llm.generate

    text = "naïve café — 日本語 ok, " + "".join(f"line {i}: the cat sat on the mat.\n" for i in range(300))
    tokenizer = HFTokenizer.train_bpe([text], vocab_size=300)
    ids, prompt_ids = tokenizer.encode(text), tokenizer.encode("x")
    decoded = []  # how many ids each decode took

    class Counting:
        vocab_size = tokenizer.vocab_size

        def decode(self, some):
            decoded.append(len(some))
            return tokenizer.decode(some)

        def ends_unsettled(self, some):
            return tokenizer.ends_unsettled(some)

    monkeypatch.setattr(llm.generate, "ANCHOR_EVERY", 64)
    pieces = list(stream_text(Scripted(ids), Counting(), prompt_ids, len(ids)))
    assert "".join(pieces) == tokenizer.decode(prompt_ids + ids)[len("x"):]
    n = len(ids)
    assert n > 1500 and sum(decoded) < 0.3 * n * n / 2, (n, sum(decoded))  # a whole decode per token: n*n/2
    monkeypatch.setattr(llm.generate, "ANCHOR_EVERY", 10**9)  # never moved: the same pieces
    assert list(stream_text(Scripted(ids), tokenizer, prompt_ids, len(ids))) == pieces


def test_a_run_of_byte_fallback_tokens_prints_once_its_characters_are_whole_and_the_text_goes_on():
    # Llama's and Mistral's tokenizers: text outside the vocabulary is byte tokens, <0x0A>, decoded a run at once
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models

    vocab = {"<unk>": 0, "a": 1, "b": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    hf = HF(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tokenizer = HFTokenizer(hf)
    for sampled in ([3 + 0x0A, 3 + 0xC3, 3 + 0xA9, 1, 2], [3 + 0x0A, 3 + 0xF8, 1, 2, 1, 2]):  # "\né", bytes no text
        pieces = list(stream_text(Scripted(sampled), tokenizer, [1], len(sampled)))
        # a "\n" printed alone would have been taken back by the run's decode: the text stopped there
        assert "".join(pieces) == tokenizer.decode([1] + sampled)[1:], pieces
    assert "".join(pieces).endswith("abab")


def test_char_pieces_follow_the_tokens_one_by_one():
    tokenizer = CharTokenizer("abc ")
    ids = tokenizer.encode("ab ca")
    assert list(stream_text(Scripted(ids), tokenizer, [0], 5)) == ["a", "b", " ", "c", "a"]


# ---- bad input: exit 2, one line on stderr -------------------------------------------------


def broken_copy(step_dir: Path, tmp_path: Path, how: str) -> Path:
    ckpt = tmp_path / "checkpoints" / "step_00000030"
    shutil.copytree(step_dir, ckpt)
    if how == "other vocabulary":  # more tokens than the model's rows (fewer would be a padded vocabulary)
        CharTokenizer("abcdefghijklmnopqrst").save(ckpt / "tokenizer.json")
        reseal(ckpt)
    elif how == "dropout out of range":  # written by hand, sealed in
        config = json.loads((ckpt / "model_config.json").read_text())
        (ckpt / "model_config.json").write_text(json.dumps({**config, "dropout": 7}))
        reseal(ckpt)
    elif how == "diverged weights":  # a run whose loss went to NaN saved them so
        state = torch.load(ckpt / "state.pt", weights_only=True)
        state["model"]["norm_f.weight"][0] = float("nan")
        torch.save(state, ckpt / "state.pt")
        reseal(ckpt)
    elif how == "tokenizer swapped after the save":
        CharTokenizer("abc").save(ckpt / "tokenizer.json")
    elif how == "truncated state":
        data = (ckpt / "state.pt").read_bytes()
        (ckpt / "state.pt").write_bytes(data[: len(data) // 2])
    elif how == "flipped byte in state":
        data = bytearray((ckpt / "state.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (ckpt / "state.pt").write_bytes(bytes(data))
    return ckpt


@pytest.mark.parametrize("how, message", [
    ("other vocabulary",
     r"error: the vocabulary does not fit the model in \S+: tokenizer.json has 20 tokens, model_config.json .*"),
    ("dropout out of range",
     r"error: \S+model_config.json is not a valid model config: GPTConfig.dropout must be in \[0, 1\), got 7"),
    ("diverged weights", r"error: checkpoint \S+: norm_f.weight holds NaN or inf, so the model's probabilities are "
                         r"not numbers: sample from an earlier checkpoint"),
    ("tokenizer swapped after the save",
     r"error: checkpoint \S+ is not valid: tokenizer.json has \d+ bytes, the manifest says \d+"),
    ("truncated state", r"error: checkpoint \S+ is not valid: state.pt has \d+ bytes, the manifest says \d+"),
])
def test_a_broken_checkpoint_exits_2_with_one_line(step_dir, tmp_path, capsys, how, message):
    ckpt = broken_copy(step_dir, tmp_path, how)
    assert main(["--checkpoint", str(ckpt), "--prompt", PROMPT]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.endswith("\n") and out.err.count("\n") == 1, out.err
    assert re.fullmatch(message, out.err.strip()), out.err


def test_finite_weights_whose_logits_overflow_end_the_sample_in_one_line_not_a_traceback(step_dir, tmp_path, capsys):
    ckpt = tmp_path / "checkpoints" / "step_00000030"
    shutil.copytree(step_dir, ckpt)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    state["model"]["norm_f.weight"].fill_(3e38)  # finite, but the logits overflow to inf
    torch.save(state, ckpt / "state.pt")
    reseal(ckpt)
    assert main(["--checkpoint", str(ckpt), "--prompt", PROMPT]) == 1
    out = capsys.readouterr()
    assert out.out == PROMPT + "\n" and out.err == (
        f"error: the model's logits for token {len(PROMPT)} are not numbers (NaN, or overflowed to inf): sample "
        f"from an earlier checkpoint\n")


def test_a_corrupt_newest_checkpoint_in_a_folder_is_skipped_with_a_warning(step_dir, tmp_path):
    newest = broken_copy(step_dir, tmp_path, "flipped byte in state")
    shutil.copytree(step_dir, tmp_path / "checkpoints" / "step_00000010")
    out = generate("--checkpoint", str(tmp_path), "--prompt", PROMPT, "--max-new-tokens", "3", cwd=tmp_path)
    assert out.returncode == 0 and len(continuation(out.stdout)) == 3
    assert out.stderr == f"warning: skipping checkpoint {newest}: state.pt does not match its sha256 checksum\n"


def test_a_folder_of_only_corrupt_checkpoints_exits_2(step_dir, tmp_path, capsys):
    broken_copy(step_dir, tmp_path, "flipped byte in state")
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_00000030: state.pt does not match"):
        assert main(["--checkpoint", str(tmp_path / "checkpoints"), "--prompt", PROMPT]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == f"error: no valid checkpoint in {tmp_path / 'checkpoints'} (1 found, none valid)\n"


@pytest.mark.parametrize("flags, message", [
    (["--checkpoint", "nope"], "error: checkpoint path nope does not exist"),
    (["--checkpoint", "."], r"error: \. is not a checkpoint and holds no step_\* checkpoints"),
    (["--prompt", ""], "error: --prompt must not be empty"),
    (["--prompt", "the Zebra"], "error: --prompt: character 'Z' is not in the char tokenizer's vocabulary of \\d+"),
])
def test_bad_input_exits_2_with_one_line_and_no_traceback(step_dir, tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    given = {"--checkpoint": str(step_dir), "--prompt": PROMPT, **dict(zip(flags[::2], flags[1::2]))}
    assert main([x for pair in given.items() for x in pair]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and "Traceback" not in out.err, out.err
    assert re.fullmatch(message, out.err.strip()), out.err


def test_a_prompt_of_bytes_that_are_not_utf8_exits_2_with_one_line(step_dir, tmp_path):
    # as a shell passes $'ab\xffc': the program's argv then holds a lone surrogate, which no tokenizer takes
    out = generate("--checkpoint", str(step_dir), "--prompt", "ab\udcffc", cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == "error: --prompt is not valid UTF-8 text (at character 3)\n"


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "-1"], "--max-new-tokens: got -1, expected an integer >= 0"),
    (["--temperature", "-0.5"], "--temperature: got -0.5, expected a finite number >= 0"),
    (["--temperature", "nan"], "--temperature: got nan, expected a finite number >= 0"),
    (["--temperature", "inf"], "--temperature: got inf, expected a finite number >= 0"),
    (["--top-k", "0"], "--top-k: got 0, expected an integer >= 1"),
    (["--top-p", "0"], "--top-p: got 0.0, expected a number above 0 and at most 1"),
    (["--top-p", "1.5"], "--top-p: got 1.5, expected a number above 0 and at most 1"),
    (["--top-p", "nan"], "--top-p: got nan, expected a number above 0 and at most 1"),
    (["--num-samples", "0"], "--num-samples: got 0, expected an integer >= 1"),
    (["--seed", "-3"], "--seed: got -3, expected an integer from 0 to 2**64 - 1"),
    (["--seed", str(2**64)], f"--seed: got {2**64}, expected an integer from 0 to 2**64 - 1"),
    (["--max-new-tokens", "ten"], "argument --max-new-tokens: invalid int value: 'ten'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu' (choose from "),
    (["--promt", "x"], "unrecognized arguments: --promt x"),
])
def test_bad_flag_values_exit_2_with_one_line(step_dir, capsys, flags, message):
    assert main(["--checkpoint", str(step_dir), "--prompt", PROMPT, *flags]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith(f"error: {message}") and out.err.count("\n") == 1


def test_characters_the_output_cannot_encode_print_as_question_marks(tmp_path, monkeypatch):
    import io

    run_dir = train_tiny_lm(tmp_path, TEXT, BLOCK, steps=2, flags=("--data-tokenizer", "byte"))
    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out, encoding="ascii"))  # as a Windows console's cp1252
    assert main(["--checkpoint", str(run_dir), "--prompt", "café 日本", "--max-new-tokens", "3"]) == 0
    assert out.getvalue().startswith(b"caf? ??")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_output_that_cannot_be_written_is_one_line(step_dir, tmp_path):
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "llm.generate", "--checkpoint", str(step_dir), "--prompt",
                                 PROMPT, "--max-new-tokens", "5"], stdout=full, stderr=subprocess.PIPE, text=True,
                                cwd=tmp_path, env=cli_env(), timeout=60)
    assert result.returncode == 1 and result.stderr == "error: cannot write to stdout: No space left on device\n"


def test_missing_required_flags_exit_2(capsys):
    assert main([]) == 2
    assert capsys.readouterr().err == "error: the following arguments are required: --checkpoint, --prompt\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_a_gpu_exits_2(step_dir, capsys):
    assert main(["--checkpoint", str(step_dir), "--prompt", PROMPT, "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "error: device 'cuda' was asked for but no CUDA device is available: use cpu\n"


def test_the_text_ends_before_the_first_stop_and_no_later_token_is_sampled(step_dir, capsys, monkeypatch):
    from llm import generate as tool
    from llm.generate import until_stop

    assert "".join(until_stop(["ab", "c<|e", "ndoftext|>more"], ["<|endoftext|>"])) == "abc"
    assert list(until_stop(["x<|", "y"], ["<|endoftext|>"])) == ["x", "<|y"]  # held back while it might begin one
    assert "".join(until_stop(["a.", "\n\nb"], ["\n\n", "."])) == "a"  # the first of them in the text
    assert "".join(until_stop(["abc"], [])) == "abc"
    assert "".join(until_stop(["aa", "ab"], ["aab"])) == "a" and list(until_stop(["END"], ["END"])) == []
    # one stop inside another: the one completed first, as the text is read, however it is split into pieces
    text, stops = "xEND\n\n\ny", ["\n\n", "END\n\n\n"]
    for pieces in ([text], list(text), ["xEN", "D\n\n\ny"], ["xEND\n", "\n\ny"]):
        assert "".join(until_stop(pieces, stops)) == "xEND"
    for pieces in (["xab.y"], list("xab.y")):
        assert "".join(until_stop(pieces, ["b.", "ab."])) == "x"  # ending together: the one that starts first

    def stopped_by_ctrl_c():
        yield "ab"
        yield "EN"  # held back: it may begin END
        raise KeyboardInterrupt

    shown = []
    with pytest.raises(KeyboardInterrupt):
        for piece in until_stop(stopped_by_ctrl_c(), ["END"]):
            shown.append(piece)
    assert "".join(shown) == "abEN"  # printed whole before the interrupt ends the text
    model, tokenizer, _ = load_lm(step_dir)
    whole = greedy(model, tokenizer, PROMPT, 20)
    stop = whole[8:11]
    sampled = []
    real = tool.stream_text
    monkeypatch.setattr(tool, "stream_text", lambda *a, **k: (sampled.append(p) or p for p in real(*a, **k)))
    assert main(["--checkpoint", str(step_dir), "--prompt", PROMPT, "--max-new-tokens", "20", "--temperature", "0",
                 "--stop", stop, "--stop", "never there"]) == 0
    assert continuation(capsys.readouterr().out) == whole[:whole.find(stop)]
    assert len("".join(sampled)) < len(whole)  # generation ended at the stop
    assert main(["--checkpoint", str(step_dir), "--prompt", PROMPT, "--stop", ""]) == 2
    assert capsys.readouterr().err == "error: --stop must not be empty\n"
