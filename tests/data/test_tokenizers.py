import json
import sysconfig
from pathlib import Path

import pytest

from tokenizers import Tokenizer as HF
from tokenizers import decoders, models, pre_tokenizers, trainers

from llm.data.tokenizers import (
    ByteTokenizer, CharTokenizer, HFTokenizer, _training_pieces, build_tokenizer, load_tokenizer,
)
from llm.errors import UsageError

SAMPLE = "Héllo, wörld!\n\tdef f(x):\n    return x * 2  # ✓ 🙂\n"


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """Real text that every machine has: a few standard-library modules."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [(stdlib / name).read_text() for name in ("textwrap.py", "string.py", "fnmatch.py", "shlex.py")] + [SAMPLE]


@pytest.fixture(scope="module")
def bpe(corpus) -> HFTokenizer:
    return build_tokenizer("bpe", corpus, vocab_size=320)


def test_byte_tokenizer_round_trips_utf8():
    tok = build_tokenizer("byte", [], 0)
    assert tok.vocab_size == 256
    ids = tok.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8"))
    assert tok.decode(ids) == SAMPLE
    assert tok.decode(ids[:-2]).endswith("\ufffd")  # "\n" and the last byte of 🙂 cut: replaced


def test_char_vocabulary_is_the_sorted_set_of_corpus_characters():
    tok = build_tokenizer("char", iter(["banana", "cab\n"]), 0)
    assert tok.chars == ["\n", "a", "b", "c", "n"] and tok.vocab_size == 5
    assert tok.encode("cab") == [3, 1, 2]
    assert tok.decode(tok.encode("banana\ncab")) == "banana\ncab"
    with pytest.raises(UsageError, match="'z' is not in the char tokenizer's vocabulary"):
        tok.encode("zebra")


def test_bpe_honours_the_vocab_size_and_round_trips(bpe):
    assert bpe.vocab_size == 320
    ids = bpe.encode(SAMPLE)
    assert max(ids) < 320 and bpe.decode(ids) == SAMPLE
    code = "def fill(text, width=70, **kwargs):\n    return text\n"
    assert len(bpe.encode(code)) < len(code.encode())  # merges learned from the corpus compress it
    # bytes never seen in training still encode (byte-level: no unknown token)
    assert bpe.decode(bpe.encode("ǅ∑")) == "ǅ∑"


@pytest.mark.parametrize("separator", ["\u00a7", "\u00abEND\u00bb", "<|endoftext|>", "<doc \u00e9>"])
def test_a_bpe_separator_decodes_as_written_whatever_its_characters(separator):
    # a byte-level decoder reads each character it has in its table as a byte: "§" was byte 0xA7 alone, "\ufffd"
    tok = build_tokenizer("bpe", iter(["hello world", separator, "foo"]), 262, separator)
    ids = tok.encode("ab" + separator + "cd")
    assert ids.count(tok.encode(separator)[0]) == 1
    assert tok.decode(ids) == "ab" + separator + "cd"
    assert tok.decode(tok.encode("é" + separator + "\U0001f642")) == "é" + separator + "\U0001f642"


def test_a_char_tokenizer_file_numbers_its_characters_in_the_order_it_lists_them(tmp_path):
    path = tmp_path / "chars.json"
    path.write_text(json.dumps({"type": "char", "chars": ["\n", " ", "b", "a"]}))  # nanoGPT's meta.pkl, converted
    tok = load_tokenizer(path)
    assert tok.encode("ab") == [3, 2] and tok.decode([2, 3, 0]) == "ba\n"
    tok.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text())["chars"] == ["\n", " ", "b", "a"]


def test_a_byte_fallback_tokenizer_ends_unsettled_after_a_byte_token_only():
    vocab = {"<unk>": 0, "a": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    hf = HF(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok = HFTokenizer(hf)
    line_feed, first_of_e_acute = 2 + 0x0A, 2 + 0xC3
    assert tok.decode([line_feed]) == "\n" and tok.decode([line_feed, first_of_e_acute]) == "\ufffd\ufffd"
    assert tok.ends_unsettled([1, line_feed]) and not tok.ends_unsettled([line_feed, 1])
    assert not tok.ends_unsettled([]) and not ByteTokenizer().ends_unsettled([0xC3])


def test_a_bpe_vocabulary_larger_than_the_corpus_has_merges_for_is_warned_of(corpus):
    with pytest.warns(UserWarning, match=r"^data.vocab_size 5000: the corpus has merges for 2\d\d tokens alone"):
        assert build_tokenizer("bpe", ["hello world, hello"], 5000).vocab_size < 300


def test_bpe_needs_room_for_the_byte_alphabet_and_the_separator(corpus):
    with pytest.raises(UsageError, match="data.vocab_size: got 100, a byte-level bpe tokenizer needs at least 256$"):
        build_tokenizer("bpe", corpus, vocab_size=100)
    assert build_tokenizer("bpe", corpus, vocab_size=256).vocab_size == 256
    # the separator's token comes on top of the 256 bytes, which are kept whatever the size: 257 tokens of 256
    with pytest.raises(UsageError, match="got 256, a byte-level bpe tokenizer needs at least 257: the 256 bytes and "
                                         "data.separator$"):
        build_tokenizer("bpe", corpus, vocab_size=256, separator="<|endoftext|>")
    assert build_tokenizer("bpe", corpus, vocab_size=257, separator="<|endoftext|>").vocab_size == 257


@pytest.mark.parametrize("spec", ["byte", "char", "bpe"])
def test_save_and_load_give_the_same_tokenizer(spec, corpus, tmp_path):
    tok = build_tokenizer(spec, corpus, vocab_size=300)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temp file left behind
    back = load_tokenizer(path)
    assert type(back) is type(tok)
    assert back.vocab_size == tok.vocab_size and back.fingerprint() == tok.fingerprint()
    assert back.encode(SAMPLE) == tok.encode(SAMPLE) and back.decode(tok.encode(SAMPLE)) == SAMPLE
    if spec != "bpe":
        assert json.loads(path.read_text())["type"] == spec
    # a saved file is also a valid spec
    assert build_tokenizer(str(path), [], 0).fingerprint() == tok.fingerprint()


def test_fingerprints_are_stable_and_follow_the_mapping(corpus):
    assert CharTokenizer.train(["abc"]).fingerprint() == CharTokenizer.train(["cba"]).fingerprint()
    assert CharTokenizer.train(["abc"]).fingerprint() != CharTokenizer.train(["abd"]).fingerprint()
    # stable across processes and versions: cache keys are made of them, so a change tokenizes every corpus again
    assert ByteTokenizer().fingerprint() == "46b1f52b27edb557"
    assert CharTokenizer.train(["abc"]).fingerprint() == "d38cf543bc438ec3"
    a = HFTokenizer.train_bpe(corpus, 300)
    assert a.fingerprint() == HFTokenizer.train_bpe(corpus, 300).fingerprint()
    assert a.fingerprint() != HFTokenizer.train_bpe(corpus, 310).fingerprint()


@pytest.mark.parametrize("content", ['{"hello": 1}', "[1, 2]", "not json at all", '{"model": {"type": "Nope"}}'])
def test_a_file_that_is_not_a_tokenizer_is_a_usage_error(content, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(UsageError, match="is not a tokenizer file") as e:
        load_tokenizer(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("chars", ['[]', '"ab"', '[1, "a"]', '[["a"]]', '["ab", "c"]', '["a", "a"]', 'null'])
def test_a_char_tokenizer_file_with_bad_chars_is_a_usage_error(chars, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(f'{{"type": "char", "chars": {chars}}}')
    with pytest.raises(UsageError, match=r"'chars' of a char tokenizer must be a list of distinct single characters$"):
        load_tokenizer(path)


def test_missing_file_and_unknown_name_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(UsageError, match=r"'bpee' \(did you mean bpe\?\), expected one of byte, char, bpe"):
        build_tokenizer("bpee", [], 0)


def test_a_tokenizer_json_made_by_the_tokenizers_library_itself_is_used_as_is(tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers, trainers

    hf = HF(models.WordPiece(unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator(["the cat sat on the mat", "a dog ate my hat"] * 20,
                           trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    path = tmp_path / "pretrained.json"
    hf.save(str(path))
    ours = load_tokenizer(path)
    assert ours.vocab_size == hf.get_vocab_size()
    assert ours.encode("the dog sat") == hf.encode("the dog sat", add_special_tokens=False).ids


def test_a_tokenizer_whose_ids_skip_numbers_has_room_for_its_largest_id(tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    hf = HF(models.WordLevel({"a": 0, "[UNK]": 1, "b": 70000}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "sparse.json"
    hf.save(str(path))
    ours = load_tokenizer(path)
    assert hf.get_vocab_size() == 3 and ours.vocab_size == 70001  # an embedding of 3 rows would not hold b
    assert ours.encode("a b") == [0, 70000]


@pytest.mark.parametrize("spec", ["byte", "char", "bpe"])
def test_encode_batch_is_encode_of_each_text(spec, corpus, bpe):
    tok = bpe if spec == "bpe" else build_tokenizer(spec, corpus, 0)
    assert tok.encode_batch(corpus) == [tok.encode(text) for text in corpus]
    assert tok.encode_batch([]) == []


def test_the_unknown_token_is_found_whichever_way_the_model_names_it(bpe):
    from tokenizers import Tokenizer as HF
    from tokenizers import models

    wordpiece = HFTokenizer(HF(models.WordPiece({"a": 0, "[UNK]": 1}, unk_token="[UNK]")))
    unigram = HFTokenizer(HF(models.Unigram([("a", -1.0), ("b", -1.0), ("<unk>", 0.0)], unk_id=2)))
    assert wordpiece.unknown_id == 1 and wordpiece.encode("z") == [1]
    assert unigram.unknown_id == 2 and unigram.encode("z") == [2]
    assert bpe.unknown_id is None and ByteTokenizer().unknown_id is None and CharTokenizer("ab").unknown_id is None


def test_a_tokenizer_file_that_cannot_encode_a_text_is_a_usage_error_not_the_librarys_exception():
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    hf = HF(models.WordPiece({"hello": 0, "world": 1}, unk_token="[UNK]"))  # its unknown token is not in it
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = HFTokenizer(hf)
    assert tok.encode("hello world") == [0, 1]
    for encode in (tok.encode, lambda text: tok.encode_batch([text])):
        with pytest.raises(UsageError, match=r"^the tokenizer cannot encode this text: .*Missing \[UNK\] token"):
            encode("hello there")


def test_a_tokenizer_without_an_unknown_token_refuses_text_it_would_drop(bpe):
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers, trainers

    words = HF(models.BPE())  # no unknown token: the library leaves out what it has no token for
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(vocab_size=30, show_progress=False))
    tok = HFTokenizer(words)
    assert tok.decode(tok.encode("hello  world\n")) == tok.decode(tok.encode("hello world"))  # spaces: not text
    for encode in (tok.encode, lambda text: tok.encode_batch(["hello", text])):
        with pytest.raises(UsageError, match=r"^the tokenizer has no token for 'x' and no unknown token"):
            encode("hello xyz world")
    bytes_only = HF(models.BPE())  # byte-level, but trained without the byte alphabet: é has no bytes in it
    bytes_only.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bytes_only.train_from_iterator(["plain text"] * 10, trainers.BpeTrainer(vocab_size=40, show_progress=False))
    with pytest.raises(UsageError, match="no token for 'é'"):
        HFTokenizer(bytes_only).encode("plain é")
    assert bpe.decode(bpe.encode("café ✓ 🙂")) == "café ✓ 🙂"  # with the alphabet every text encodes


def test_a_tokenizer_file_that_pads_or_truncates_encodes_text_whole(tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    hf = HF(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "a": 2, "b": 3}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.enable_padding(pad_id=1, pad_token="[PAD]")  # as files made for batched model inputs often are
    hf.enable_truncation(max_length=3)
    hf.save(str(tmp_path / "padded.json"))
    tok = load_tokenizer(tmp_path / "padded.json")
    assert tok.encode("a b a b a") == [2, 3, 2, 3, 2]
    assert tok.encode_batch(["a b a b", "a"]) == [[2, 3, 2, 3], [2]]  # no pads, nothing cut


def test_bpe_is_trained_on_pieces_cut_where_the_pre_tokenizer_splits_so_the_vocabulary_is_the_same(corpus):
    text = " ".join(corpus).replace("\n", " ")  # one line of hundreds of thousands of characters
    pieces = list(_training_pieces([text, "x" * 10_000], limit=4096))
    assert "".join(pieces) == text + "x" * 10_000
    # cut before a space or newline between two other characters
    assert all(len(p) <= 4096 for p in pieces) and all(p[0] in " \n" and not p[1].isspace() for p in pieces[1:-3])
    assert [len(p) for p in pieces[-3:]] == [4096, 4096, 10_000 - 2 * 4096]  # no space: cut at the limit
    whole = HF(models.BPE())
    whole.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    whole.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                          special_tokens=[], show_progress=False))
    assert HFTokenizer.train_bpe([text], 400).hf.get_vocab() == whole.get_vocab()
