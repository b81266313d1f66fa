"""Tokenizers for text data: byte, char, byte-level BPE, or an existing HF ``tokenizer.json``.

All share one interface (:class:`Tokenizer`) and save to one JSON file that
:func:`load_tokenizer` reads back: Hugging Face's format for BPE and loaded
tokenizers, a small ``{"type": ...}`` document of our own for byte and char.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tokenizers as hf
from tokenizers import decoders, models, pre_tokenizers, trainers

from llm.errors import UsageError, closest, one_line
from llm.files import write_atomically
from llm.training.core.config import BUILTIN_TOKENIZERS as BUILTIN, MAX_VOCAB_SIZE


class UncoveredText(UsageError):
    """Text a tokenizer cannot encode: a character a char tokenizer never saw, or text a tokenizer file has no
    token for and no unknown token to stand for."""


class Tokenizer(ABC):
    """Text <-> token ids. ``fingerprint()`` changes whenever the mapping does."""

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    pieces_at_once = 1
    """How many texts ``encode_batch`` is worth being given at once: more only where they run in parallel."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` of each text; tokenizers that can encode them in parallel do."""
        return [self.encode(text) for text in texts]

    @property
    def unknown_id(self) -> int | None:
        """The id text outside the vocabulary encodes to, if there is one (byte and char have none)."""
        return None

    @property
    def special(self) -> dict[int, str]:
        """Tokens that stand for no text but mark something (a document's end, as GPT-2's <|endoftext|>), by id,
        each matched whole wherever its text appears (byte and char have none)."""
        return {}

    def count_unknown(self, ids: Sequence[int] | np.ndarray) -> int:
        """How many of ``ids`` are the unknown token: text the vocabulary does not cover, trained and scored as
        one token whatever it was."""
        return 0 if self.unknown_id is None else int(np.count_nonzero(np.asarray(ids) == self.unknown_id))

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    def ends_unsettled(self, ids: Sequence[int]) -> bool:
        """Whether the text of ``ids`` may still change before their end when more tokens follow: a run of byte
        tokens that a byte-fallback decoder reads as one (Llama's and Mistral's ``<0x0A>``), whose bytes are
        all replacement characters until they make whole characters. Not a character cut in half, which a
        decode shows as one replacement character at the end."""
        return False

    @abstractmethod
    def to_json(self) -> str:
        """The whole tokenizer as the text of a ``tokenizer.json``."""

    def fingerprint(self) -> str:
        """A stable id of the mapping (a hash of the saved form), used in cache keys."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` to ``path`` (atomically: no half-written file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, self.to_json())


class ByteTokenizer(Tokenizer):
    """The 256 byte values of the UTF-8 encoding; nothing to train."""

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        # a sampled sequence may cut a multi-byte character in half
        return bytes(ids).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"type": "byte"})


class CharTokenizer(Tokenizer):
    """One id per character: ``chars[i]`` is id i. Trained, the characters of the text in sorted order."""

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)  # a file's order is its numbering: loaded as written, not sorted again
        self._ids = {c: i for i, c in enumerate(self.chars)}
        if len(self._ids) < len(self.chars):
            raise ValueError("CharTokenizer: the characters must be distinct")

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(sorted(seen))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise UncoveredText(
                f"character {e.args[0]!r} is not in the char tokenizer's vocabulary of {self.vocab_size}"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False)


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer: a trained byte-level BPE or a loaded file."""

    pieces_at_once = max(2, min(os.cpu_count() or 1, 8))  # one thread each; a corpus piece costs ~15 MB

    def __init__(self, tokenizer: hf.Tokenizer):
        # a file made for model inputs may pad or truncate: on a corpus stream that would invent or drop text
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.hf = tokenizer

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, special: list[str] = ()) -> HFTokenizer:
        """Byte-level BPE (GPT-2 style): any text encodes, with no unknown token; each of ``special`` is one
        token, wherever it stands in a text."""
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + len(special):  # the 256 bytes are kept whatever the size: the special
            # tokens would come on top of a size below that
            needs = f"{len(alphabet) + len(special)}: the {len(alphabet)} bytes and data.separator" if special \
                else len(alphabet)
            raise UsageError(f"data.vocab_size: got {vocab_size}, a byte-level bpe tokenizer needs at least {needs}")
        tok = hf.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=alphabet, special_tokens=list(special), show_progress=False
        )
        tok.train_from_iterator(_training_pieces(texts), trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        # the largest id + 1, which the embedding needs: a loaded file's ids may skip numbers, and
        # get_vocab_size counts entries (vocab {a: 0, b: 70000} has 2 of them)
        return max(self.hf.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        with _cannot_encode():
            # a corpus is one stream: no [CLS]/[SEP]-style tokens around each piece; one thread per core
            encodings = self.hf.encode_batch(texts, add_special_tokens=False)
        if not self._covers_any_text:
            for text, encoding in zip(texts, encodings):
                if _leaves_out_text(text, encoding.offsets):
                    # the offsets of what is kept shift when something is left out: find it by itself
                    missing = next((c for c in dict.fromkeys(text)
                                    if not c.isspace() and not self.hf.encode(c, add_special_tokens=False).ids), None)
                    what = "some of the text" if missing is None else repr(missing)
                    raise UncoveredText(f"the tokenizer has no token for {what} and no unknown token to stand for it: "
                                     f"that text would be left out")
        return [e.ids for e in encodings]

    @property
    def special(self) -> dict[int, str]:
        return {i: token.content for i, token in self.hf.get_added_tokens_decoder().items() if token.special}

    @functools.cached_property
    def _covers_any_text(self) -> bool:
        """Whether every text encodes whole: into the unknown token where the vocabulary has none for it, or
        byte by byte. Without either, the tokenizers library leaves out what it has no token for, silently."""
        if self.unknown_id is not None:
            return True
        byte_level = '"ByteLevel"' in json.dumps(self._document.get("pre_tokenizer"))
        return byte_level and set(pre_tokenizers.ByteLevel.alphabet()) <= set(self.hf.get_vocab())

    @functools.cached_property
    def _document(self) -> dict:
        """The tokenizer as its tokenizer.json describes it, read once (for a large vocabulary, megabytes)."""
        return json.loads(self.hf.to_str())

    @functools.cached_property
    def unknown_id(self) -> int | None:
        model = self._document["model"]  # WordPiece and BPE name the token, Unigram gives its id
        if model.get("unk_id") is not None:
            return model["unk_id"]
        return self.hf.token_to_id(model["unk_token"]) if model.get("unk_token") else None

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        verbatim = self._decoded_otherwise
        if not verbatim or verbatim.keys().isdisjoint(ids):  # most tokenizers: no such token
            return self.hf.decode(ids, skip_special_tokens=False)
        parts, run = [], []
        for i in ids:
            if i in verbatim:
                parts += [self.hf.decode(run, skip_special_tokens=False), verbatim[i]]
                run = []
            else:
                run.append(i)
        return "".join(parts) + self.hf.decode(run, skip_special_tokens=False)

    @functools.cached_property
    def _decoded_otherwise(self) -> dict[int, str]:
        """Special tokens that the decoder gives back otherwise than as written, by id: a byte-level decoder
        reads each character of a token as a byte where its table has it, so a separator of Latin-1 characters
        (``§``) came back as replacement characters. Those are put in as written."""
        return {i: text for i, text in self.special.items() if self.hf.decode([i], skip_special_tokens=False) != text}

    def ends_unsettled(self, ids: Sequence[int]) -> bool:
        return bool(ids) and ids[-1] in self._fallback_bytes

    @functools.cached_property
    def _fallback_bytes(self) -> frozenset[int]:
        """The ids of the byte tokens (``<0x0A>``) of a tokenizer whose decoder reads runs of them as bytes."""
        if '"ByteFallback"' not in json.dumps(self._document.get("decoder")):
            return frozenset()
        return frozenset(i for token, i in self.hf.get_vocab(with_added_tokens=False).items()
                         if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token))

    def to_json(self) -> str:
        return self.hf.to_str()


@contextlib.contextmanager
def _cannot_encode() -> Iterator[None]:
    """The tokenizers library's own error for a text its model cannot encode (a WordPiece file whose
    unknown token is not in its vocabulary, a Unigram one without unk_id) as a UsageError."""
    try:
        yield
    except Exception as e:  # the library raises a bare Exception
        raise UncoveredText(f"the tokenizer cannot encode this text: {one_line(e, 200)}") from None


def _leaves_out_text(text: str, offsets: list[tuple[int, int]]) -> bool:
    """Whether the tokens' spans (``offsets``, in characters) leave a character of ``text`` other than
    whitespace uncovered: the tokenizer dropped it. Whitespace a pre-tokenizer splits on is not text lost."""
    starts_and_ends = np.zeros(len(text) + 1, dtype=np.int64)
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    np.add.at(starts_and_ends, spans[:, 0], 1)
    np.add.at(starts_and_ends, spans[:, 1], -1)
    return any(not text[i].isspace() for i in np.flatnonzero(np.cumsum(starts_and_ends[:-1]) == 0))


BPE_PIECE_CHARS = 4096
"""Longest text the BPE trainer is given at once."""


def _training_pieces(texts: Iterable[str], limit: int = BPE_PIECE_CHARS) -> Iterator[str]:
    """``texts`` in pieces of at most ``limit`` characters, each cut where one lies in its second half before a
    lone space or newline (one between two other characters), where the pre-tokenizer splits anyway: the words
    the trainer counts are the same.

    The trainer's time on one word grows with the word's length squared: a
    line of DNA, base64 or minified JSON, millions of characters without a
    space, took minutes (400,000 characters: 30 s; in pieces, 0.2 s).
    """
    for text in texts:
        start = 0
        while len(text) - start > limit:
            end = start + limit
            # up to end + 1: the lookahead sees the character after a space at end - 1
            cuts = [m.start() for m in _LONE_SPACE.finditer(text, start + limit // 2, end + 1)]
            stop = cuts[-1] if cuts else end
            yield text[start:stop]
            start = stop
        yield text[start:]


_LONE_SPACE = re.compile(r"(?<=\S)[ \n](?=\S)")


def build_tokenizer(spec: str, texts: Iterable[str], vocab_size: int, separator: str = "") -> Tokenizer:
    """``byte``, ``char`` or ``bpe`` (trained on ``texts``), or the path of a saved tokenizer. A bpe takes
    ``separator`` (the text between documents) as a token of its own, which no merge reaches into.

    ``texts`` is only read by the tokenizers that need training.
    """
    if spec == "byte":
        return ByteTokenizer()
    if spec == "char":  # the separator's characters, whether or not it stands between two training files
        return CharTokenizer.train(itertools.chain(texts, [separator] if separator else []))
    if spec == "bpe":  # the separator's own text is not counted: merges of it would be tokens never used
        texts = (text for text in texts if not separator or text != separator)
        tokenizer = HFTokenizer.train_bpe(texts, vocab_size, [separator] if separator else [])
        if tokenizer.vocab_size < vocab_size:  # a size chosen as a multiple of 64 for the matmuls, say
            warnings.warn(f"data.vocab_size {vocab_size}: the corpus has merges for {tokenizer.vocab_size} tokens "
                          f"alone, which the BPE tokenizer has (--model-vocab-size pads the model's vocabulary)")
        return tokenizer
    check_spec(spec)
    return load_tokenizer(spec)


def check_spec(spec: str) -> None:
    """Raise UsageError unless ``spec`` names a built-in tokenizer or an existing file."""
    if spec in BUILTIN or Path(spec).expanduser().is_file():
        return
    hint = closest(spec, BUILTIN)
    raise UsageError(
        f"data.tokenizer: got {spec!r}{hint}, expected one of {', '.join(BUILTIN)} or the path of a tokenizer.json"
    )


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Read any tokenizer saved by :meth:`Tokenizer.save`, or a Hugging Face ``tokenizer.json``."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"tokenizer file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not a tokenizer file: {getattr(e, 'strerror', None) or e}") from None
    not_one = f"{path} is not a tokenizer file (expected a tokenizer.json saved by llm or by Hugging Face tokenizers)"
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise UsageError(not_one) from None
    if not isinstance(data, dict):
        raise UsageError(not_one)
    kind = data.get("type")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        chars = data.get("chars")
        if not isinstance(chars, list) or not chars or len(set(map(repr, chars))) < len(chars) or \
                not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise UsageError(f"{path}: 'chars' of a char tokenizer must be a list of distinct single characters")
        if surrogates := [c for c in chars if "\ud800" <= c <= "\udfff"]:
            raise UsageError(f"{path}: 'chars' holds {surrogates[0]!r}, half of a UTF-16 pair, which no text holds "
                             f"and UTF-8 cannot write")
        return CharTokenizer(chars)
    if "model" not in data:
        raise UsageError(not_one)
    try:
        tokenizer = HFTokenizer(hf.Tokenizer.from_str(text))
    except Exception as e:  # the library raises a bare Exception with a parse message
        raise UsageError(f"{not_one}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if tokenizer.vocab_size > MAX_VOCAB_SIZE:  # the embedding has a row for every id up to the largest
        raise UsageError(f"{path}: its largest token id is {tokenizer.vocab_size - 1:,}; a model's vocabulary has at "
                         f"most {MAX_VOCAB_SIZE:,} entries, as model.vocab_size")
    return tokenizer
