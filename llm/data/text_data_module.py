"""TextDataModule: a text corpus, tokenized once into a cached memory-mapped token file.

The cache entry is a folder ``<data.cache_dir>/<key>/`` holding ``tokens.bin``,
the ``tokenizer.json`` that made it and ``tokens.size``, the byte count written. The key
hashes the corpus bytes and the tokenizer recipe, so an edited corpus or another
tokenizer gets a new entry; a ``tokens.bin`` that is not the size written is damaged,
and is tokenized again. The files of cache entries are never part of the corpus.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import glob
import hashlib
import itertools
import logging
import os
import re
import shutil
import socket
import sysconfig
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers as hf
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from llm.data.data_module import BaseDataModule
from llm.data.tokenizers import BUILTIN, Tokenizer, UncoveredText, build_tokenizer, check_spec, load_tokenizer
from llm.errors import UsageError
from llm.files import fsync, is_run_output
from llm.training.core import distributed as D

log = logging.getLogger(__name__)

CACHE_FORMAT = "5"
"""Bump when the cache layout, the key or the tokenization changes, so old entries are not trusted
(2: the key hashes the corpus's digest, which checkpoints keep; 3: pieces of 128K characters, not 1M, and a
file's byte order mark left out; 4: tokens.size holds the tokens' digest; 5: pieces cut before whitespace)."""
WRITING = ".writing"
"""In an entry being written: a file its writer holds locked (flock) for as long as it is at work."""
DEFAULT_CORPUS_BYTES = 4 << 20
"""Cap on the default corpus (the stdlib sources): 4 MiB, about four million tokens of the char tokenizer,
tokenized in seconds."""
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_CHUNK_CHARS = 1 << 17
"""Characters per piece the tokenizer encodes (cut before whitespace, see _pieces): the tokenizers library's
memory per piece grows faster than the piece; 1M-character pieces took 13 times the memory of these, and BPE's
prepare_data 3.7 times as long (BENCHMARKS.md, data pipeline)."""
_BLOCK_BYTES = 1 << 20
TOKENS, TOKENIZER, SIZE = "tokens.bin", "tokenizer.json", "tokens.size"


def default_corpus_files(limit_bytes: int = DEFAULT_CORPUS_BYTES) -> list[Path]:
    """The Python standard library's own ``.py`` files, up to ``limit_bytes``, in an order fixed by a hash of
    their paths.

    Real text present on every machine with Python. Test suites and installed
    packages (site-packages) are left out: they vary between machines. Not in
    sorted order: the validation split, the corpus's last tenth, would then be the
    modules last in the alphabet of those taken (in 4 MiB, ``encodings``' codec
    tables), no sample of the rest.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    files, total = [], 0
    for path in sorted(found, key=lambda p: _path_hash(p.relative_to(root))):
        size = path.stat().st_size
        if total + size > limit_bytes:
            break
        files.append(path)
        total += size
    return files


def _path_hash(path: Path) -> str:
    return hashlib.sha256(path.as_posix().encode()).hexdigest()


def corpus_files(spec: str, setting: str = "data.path") -> list[Path]:
    """``data.path`` (or ``setting``) as a sorted list of files: one file, a folder (recursively) or a glob.

    Hidden files and folders (names starting with a dot), what runs wrote (run and
    checkpoint folders, files.is_run_output) and token caches (any run's entries,
    is_cache_entry) are skipped in folders; linked folders are followed. Each file
    is read once, however many paths lead to it.
    """
    if not spec:
        return default_corpus_files()
    if glob.has_magic(spec) and not Path(spec).expanduser().exists():  # a name with [ ] * ? is a name first
        matched = [Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p)]
        files = _each_once(f for f in matched if not is_cache_entry(f.parent))  # tokens, not text
        if not files:
            raise UsageError(f"{setting}: the glob {spec!r} matches no files{', only token caches' if matched else ''}")
        return files
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        if is_cache_entry(path):
            raise UsageError(f"{setting}: {spec} is a token cache entry (tokens.bin), not text")
        if is_run_output(path):  # checkpoints and logs, which a folder of text skips below it
            raise UsageError(f"{setting}: {spec} is what a training run wrote (a run or checkpoint folder), not text; "
                             f"for text in it, give a glob such as '{os.path.join(spec, '**', '*.txt')}'")
        files, others, walked, caches = [], [], set(), []
        for dirpath, dirnames, filenames in os.walk(path, followlinks=True):  # a linked folder is below it too
            if os.path.realpath(dirpath) in walked:  # reached again through a link: a loop ends here
                dirnames[:] = []
                continue
            walked.add(os.path.realpath(dirpath))
            # a run's folder inside the data folder (--data-path . and runs/ below it): checkpoints and logs, no text
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not is_run_output(Path(dirpath, d)))
            entries = [d for d in dirnames if is_cache_entry(Path(dirpath, d))]  # tokens, not text
            dirnames[:], caches = [d for d in dirnames if d not in entries], caches + entries
            for name in filenames:
                if not name.startswith("."):  # a broken link or a pipe is no text to read (a pipe never ends)
                    (files if os.path.isfile(os.path.join(dirpath, name)) else others).append(Path(dirpath, name))
        if others:
            warnings.warn(f"{setting}: skipping {len(others)} entries of {spec} that are not files (broken links, "
                          f"pipes, ...), such as {min(others)}", stacklevel=2)
        if not files:
            raise UsageError(f"{setting}: the folder {spec} holds no files{', only token caches' if caches else ''}")
        return _each_once(files)
    if path.exists():
        raise UsageError(f"{setting}: {spec} is neither a file nor a folder (expected a text file, a folder or a glob)")
    raise UsageError(f"{setting}: {spec} does not exist (expected a text file, a folder or a glob)")


def is_cache_entry(folder: Path) -> bool:
    """Whether ``folder`` is an entry of a token cache, this run's or another's (it holds tokens.bin and
    tokens.size): tokens, which a corpus never reads as text."""
    return (folder / TOKENS).is_file() and (folder / SIZE).is_file()


def _identity(path: Path) -> tuple[int, int]:
    """What tells a file from every other: its device and inode, the same through links of either kind."""
    st = path.stat()
    return st.st_dev, st.st_ino


def _each_once(files: Iterable[Path]) -> list[Path]:
    """``files`` sorted, each file once however many paths (links of either kind, a glob's ``**`` twice) lead
    to it: the first of its paths in sorted order names it."""
    first: dict[Any, Path] = {}
    for file in sorted(files):
        try:
            key: Any = _identity(file)
        except OSError:  # gone since it was listed: reading it says so
            key = file
        first.setdefault(key, file)
    return sorted(first.values())


def read_text(path: Path, strict: bool = True) -> str:
    """A whole UTF-8 file; with ``strict`` False, "" for a file that is not UTF-8 or cannot be read."""
    return "".join(read_pieces(path, strict))


def read_pieces(path: Path, strict: bool = True, size: int = _CHUNK_CHARS, setting: str = "data.path",
                digest: Any = None) -> Iterator[str]:
    """A UTF-8 file as pieces of about ``size`` characters, cut where _pieces cuts, read a block at a time,
    so a corpus larger than memory is never held whole. ``strict`` False (for the default corpus) skips
    a file that is not UTF-8 or cannot be read; such files are small, so they are read whole first.
    Otherwise such a file is a UsageError naming ``setting``, the option that gave the path. ``digest``: a
    hash given the bytes read, as _hash_file gives them."""
    if not strict:
        try:
            data = path.read_bytes()
        except OSError:
            return
        if digest is not None:
            digest.update(_length(len(data)))
            digest.update(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return
        yield from _pieces([text.removeprefix(BOM)], size)
        return
    yield from _pieces(_without_bom(_decoded_blocks(path, setting, digest)), size)


BOM = "\ufeff"
"""The byte order mark some editors (Windows') put at the start of a UTF-8 file: a mark, not text. A corpus
folder of such files would otherwise carry one, unseen, at the start of each file."""


def _without_bom(blocks: Iterable[str]) -> Iterator[str]:
    """``blocks`` with a byte order mark at the start of the first non-empty one left out."""
    started = False
    for block in blocks:
        if not started and block:
            block, started = block.removeprefix(BOM), True
        yield block


def encode_pieces(tokenizer: Tokenizer, pieces: Iterable[str]) -> Iterator[np.ndarray]:
    """The token ids of each piece of a text, as arrays of the smallest type that holds them, encoded a few
    pieces at a time (``tokenizer.pieces_at_once``: a thread each)."""
    dtype = token_dtype(tokenizer.vocab_size)
    for batch in _batched(pieces, tokenizer.pieces_at_once):
        for ids in tokenizer.encode_batch(batch):
            yield np.asarray(ids, dtype=dtype)


def _decoded_blocks(path: Path, setting: str, digest: Any = None) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes read before this block
    try:
        with open(path, "rb") as f:
            if digest is not None:
                digest.update(_length(os.fstat(f.fileno()).st_size))
            while True:
                block = f.read(_BLOCK_BYTES)
                if digest is not None:
                    digest.update(block)
                pending = len(decoder.getstate()[0])  # the tail of a character cut by the last block
                try:
                    yield decoder.decode(block, final=not block)
                except UnicodeDecodeError as e:  # e.start counts from the pending bytes
                    raise UsageError(f"{setting}: {path} is not UTF-8 text (byte {offset - pending + e.start}); "
                                     f"convert or remove it") from None
                if not block:
                    return
                offset += len(block)
    except OSError as e:
        raise UsageError(f"{setting}: cannot read {path}: {e.strerror or e}") from None


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The smallest unsigned type that holds every id: uint16 up to 65536 symbols."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


class TokenWindows(Dataset):
    """Windows of ``block_size + 1`` tokens from a token file, as (inputs, targets) shifted by one.

    The ``count`` windows tile the tokens: item ``i`` starts at token ``i * block_size``, and item
    ``i + s * count``, for a shift ``s`` up to ``max_shift``, is the same window ``s`` tokens further on,
    which an epoch of EpochShifts reads. The file is mapped lazily in each process, so loader workers re-open
    it instead of receiving a copy.
    """

    def __init__(self, path: Path, dtype: type, start: int, stop: int, block_size: int, count: int,
                 max_shift: int = 0):
        self.path, self.dtype, self.start, self.stop = path, dtype, start, stop
        self.block_size, self.count, self.max_shift = block_size, count, max_shift
        self._tokens: np.ndarray | None = None
        self._windows: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        """The split's tokens, mapped once per process."""
        if self._tokens is None:  # a plain view of the map: indexing a memmap object costs twice as much
            mapped = np.memmap(self.path, dtype=self.dtype, mode="r")[self.start:self.stop]
            self._tokens = mapped.view(np.ndarray)
        return self._tokens

    @property
    def windows(self) -> np.ndarray:
        """Every run of ``block_size + 1`` tokens, as a strided view of the tokens: nothing is copied."""
        if self._windows is None:
            self._windows = sliding_window_view(self.tokens, self.block_size + 1)
        return self._windows

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None, "_windows": None}

    def __len__(self) -> int:
        return self.count

    def _starts(self, indices: list[int]) -> list[int]:
        """Where each window asked for starts, worked out in Python: right after a training step, on cold caches,
        each numpy call on a batch's few indices costs about 10 us, a share of a small model's step."""
        if min(indices) < 0 or max(indices) >= self.count * (self.max_shift + 1):
            raise IndexError(f"no window {indices}: there are {self.count}, each shifted by 0 to {self.max_shift} "
                             f"tokens")
        return [i % self.count * self.block_size + i // self.count for i in indices]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = torch.from_numpy(self.windows[self._starts([i])[0]].astype(np.int64))
        return chunk[:-1], chunk[1:]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch in one gather: the DataLoader calls this instead of __getitem__ per window,
        which saves a tensor and a collate per window (about 20x less time per batch)."""
        batch = self.windows[self._starts(indices)].astype(np.int64)
        return torch.from_numpy(batch[:, :-1].copy()), torch.from_numpy(batch[:, 1:].copy())


class EpochShifts(DistributedSampler):
    """DistributedSampler over TokenWindows that tile the training tokens, which moves every window of an epoch
    by one shift, drawn from the seed and the epoch: each epoch reads all but fewer than 2 * block_size of the
    tokens once, and the windows' edges fall elsewhere from one epoch to the next. The same on every rank and in
    a resumed run, as the order is."""

    def shift(self) -> int:
        return int(np.random.default_rng([self.seed, self.epoch]).integers(self.dataset.max_shift + 1))

    def __iter__(self) -> Iterator[int]:
        moved = self.shift() * len(self.dataset)  # type: ignore[arg-type]
        return iter([i + moved for i in super().__iter__()])  # a list's iterator, as DistributedSampler's


def already_batched(batch: Any) -> Any:
    """The collate function for datasets whose __getitems__ returns a finished batch."""
    return batch


class TextDataModule(BaseDataModule):
    """Next-token windows of a text corpus (``data.path``; by default the stdlib sources).

    Training windows tile the training tokens, all moved by a shift drawn per epoch (EpochShifts);
    validation is the last ``data.val_fraction`` of the token stream, or the text of
    ``data.val_path``'s files, put after the training files, cut into consecutive windows.
    """

    def __init__(self, config):
        super().__init__(config)
        self.tokenizer: Tokenizer | None = None
        self.cache_hit = False
        """Whether the last prepare_data() found the tokenized corpus already cached."""
        self.cache_path: Path | None = None
        self.corpus_digest: str | None = None
        """SHA-256 of the corpus's files, set with the cache entry: the text the windows are drawn from."""
        self.tokens_digest: str | None = None
        """SHA-256 of the tokens the corpus gave, as the cache entry records it (set in setup): for checkpoints to
        pin, since the same corpus tokenized otherwise moves the windows too."""
        self.train_set: TokenWindows | None = None
        self.val_set: TokenWindows | None = None
        self._file_digests: dict[Path, str] = {}  # of each file the cache key hashed

    # ---- the cache ---------------------------------------------------------------

    def _files(self) -> tuple[list[Path], int]:
        """The corpus's files, and how many of the first are the training data's: all of data.path's, or with
        data.val_path, data.path's but those of data.val_path, whose files follow them."""
        d = self.config.data
        train = self._text_files(d.path, "data.path")
        if not d.val_path:
            return train, len(train)
        held_out = self._text_files(d.val_path, "data.val_path")
        kept = {_identity(f) for f in held_out}
        train = [f for f in train if _identity(f) not in kept]  # a validation file in the training folder
        if not train:
            raise UsageError(f"data.path: every file of {d.path or 'the default corpus'} is one of data.val_path "
                             f"{d.val_path}'s: none is left to train on")
        return train + held_out, len(train)

    def _text_files(self, spec: str, setting: str) -> list[Path]:
        files = corpus_files(spec, setting)
        # a byte order mark alone is no text either: a char tokenizer would have no character to hold
        if spec and all(f.stat().st_size <= len(BOM.encode()) and not f.read_bytes().removeprefix(BOM.encode())
                        for f in files):
            raise UsageError(f"{setting}: {spec} is empty (0 bytes of text)")
        return files

    def _cache_dir(self) -> Path:
        d = self.config.data
        return Path(d.cache_dir).expanduser() if d.cache_dir else Path.home() / ".cache" / "llm"

    def _texts(self, files: list[Path], setting: str = "data.path") -> Iterator[str]:
        """The corpus as pieces of about 128K characters, file after file, data.separator a piece of its own
        between two files; ``setting``: the option that named the files."""
        strict = setting != "data.path" or bool(self.config.data.path)  # the default corpus skips non-UTF-8 files
        separator = self.config.data.separator
        for i, f in enumerate(files):
            if i and separator:
                yield separator
            read = hashlib.sha256()
            yield from read_pieces(f, strict, setting=setting, digest=read)
            if read.hexdigest() != self._file_digests.get(f, read.hexdigest()):  # edited since the cache key
                raise UsageError(f"{setting}: {f} changed while it was tokenized; run again once it is written")

    def _cache_entry(self, files: list[Path], n_train: int) -> Path:
        """``<cache_dir>/<key>``, the key hashing the corpus bytes and the tokenizer recipe (and where the
        validation files begin, with data.val_path)."""
        d = self.config.data
        check_spec(d.tokenizer)
        if d.tokenizer == "bpe":
            recipe = f"bpe:{d.vocab_size}:tokenizers-{hf.__version__}"
        elif d.tokenizer in BUILTIN:
            recipe = d.tokenizer
        else:
            recipe = "file:" + load_tokenizer(d.tokenizer).fingerprint()
        corpus = hashlib.sha256()
        self._file_digests = {}
        for i, f in enumerate(files):
            own = hashlib.sha256()  # each file's too: _texts checks that what it tokenizes is what was hashed
            try:
                _hash_file(_Both(corpus, own), f)
                self._file_digests[f] = own.hexdigest()
            except OSError as e:
                if i >= n_train or d.path:
                    setting = "data.path" if i < n_train else "data.val_path"
                    raise UsageError(f"{setting}: cannot read {f}: {e.strerror or e}") from None
                corpus.update(b"unreadable")  # the default corpus skips it
        self.corpus_digest = corpus.hexdigest()
        if d.separator:  # none: the key of the versions before data.separator, whose entries stay good
            recipe += f"\0separator:{d.separator}"
        if d.val_path:  # the tokenizer is trained on the files before them
            recipe += f"\0validation from file {n_train}"
        key = hashlib.sha256(f"text-cache-{CACHE_FORMAT}\0{recipe}\0{self.corpus_digest}".encode()).hexdigest()
        return self._cache_dir() / key[:32]

    def prepare_data(self) -> None:
        """Build the tokenizer and tokenize the corpus into the cache, unless it is there already."""
        files, n_train = self._files()
        entry = self.cache_path = self._cache_entry(files, n_train)
        with _readable(entry):
            found = entry.exists()
            tokenizer, unreadable = _read_tokenizer(entry)
            damage = _damage(entry, split=bool(self.config.data.val_path)) or unreadable
            self.cache_hit = (entry / TOKENS).is_file() and tokenizer is not None and not damage
        if self.cache_hit:
            self.tokenizer = tokenizer  # read and checked: setup() in this process need not read it again
            return
        if damage:
            warnings.warn(f"data.cache_dir: the cache entry {entry} is damaged ({damage}): tokenizing again")
        # an entry damaged or emptied by hand: the rename below needs the name free. Only one found so: one that
        # another node sharing the cache renamed into place since is whole, and the rename below keeps it
        if found:
            shutil.rmtree(entry, ignore_errors=True)  # another node sharing the cache may be deleting it too
        d = self.config.data
        # trained on the training files alone: the validation text is held out of the vocabulary too
        tokenizer = build_tokenizer(d.tokenizer, self._texts(files[:n_train]), d.vocab_size, d.separator)
        try:
            n = self._write_entry(tokenizer, files, n_train, entry)
        except OSError as e:  # a cache folder under a file, read-only or full
            raise UsageError(
                f"data.cache_dir: cannot write the tokenized corpus to {entry.parent}: {e.strerror or e}; "
                f"choose a writable folder with --data-cache-dir DIR"
            ) from None
        log.info("tokenized %d files into %d tokens (vocab %d) at %s", len(files), n, tokenizer.vocab_size, entry)

    def _write_entry(self, tokenizer: Tokenizer, files: list[Path], n_train: int, entry: Path) -> int:
        """Tokenize the files into the cache entry, recording where the validation files' tokens begin (with
        data.val_path: the first ``n_train`` files are the training data); the number of tokens written."""
        entry.parent.mkdir(parents=True, exist_ok=True)
        # fill a folder of this process's own, then rename it into place: a crash leaves no entry to trust.
        # Not mkdtemp: its mode 0700 would stay with the entry and lock out others sharing the cache folder
        _remove_abandoned(entry.parent)
        tmp = entry.parent / f".{entry.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        # made and locked under a name _remove_abandoned passes over, then renamed: under its own name, another
        # tokenization could find it unlocked between the two and delete it
        unlocked = tmp.with_name(tmp.name + ".new")
        unlocked.mkdir()
        writing = os.open(unlocked / WRITING, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(writing, fcntl.LOCK_EX)  # released when this process ends, however it ends
            unlocked.rename(tmp)
            tokenizer.save(tmp / TOKENIZER)
            n = unknown = 0
            digest = hashlib.sha256()
            separator = self._separator_tokens(tokenizer) if len(files) > 1 else []  # else it stands nowhere
            boundary = None
            with open(tmp / TOKENS, "wb") as out:
                trained_here = self.config.data.tokenizer in ("char", "bpe") and bool(self.config.data.val_path)
                for i, file in enumerate(files):
                    setting = "data.path" if i < n_train else "data.val_path"
                    if i == n_train:
                        boundary = n  # the validation split starts here, with the separator
                    try:
                        for array in itertools.chain(separator if i else [],
                                                     encode_pieces(tokenizer, self._texts([file], setting))):
                            data = array.tobytes()
                            out.write(data)
                            digest.update(data)
                            n += len(array)
                            unknown += tokenizer.count_unknown(array)
                    except UncoveredText as e:  # a tokenizer file that does not cover the corpus
                        raise UsageError(
                            f"{setting}: {file}: {e} (data.tokenizer {self.config.data.tokenizer}"
                            f"{', trained on data.path' if trained_here else ''}); "
                            f"use a tokenizer that covers the corpus, such as byte"
                        ) from None
            if unknown:
                named = "data.path and data.val_path" if self.config.data.val_path else "data.path"
                warnings.warn(f"{named}: {unknown:,} of the corpus's {n:,} tokens ({unknown / n:.2%}) are the "
                              f"unknown token of data.tokenizer {self.config.data.tokenizer}: it does not cover "
                              f"all of the text; training goes on with them")
            split = "" if boundary is None else f"{boundary}\n"  # where validation begins, with data.val_path
            (tmp / SIZE).write_text(f"{(tmp / TOKENS).stat().st_size}\n{digest.hexdigest()}\n{split}")
            (tmp / WRITING).unlink()  # the entry holds its three files only; the lock is held until the close below
            for path in (tmp / TOKENIZER, tmp / TOKENS, tmp / SIZE):  # on disk before the rename shows them
                fsync(path)
            _sync_folder(tmp)
            try:
                os.replace(tmp, entry)
            except OSError:  # another node sharing the cache folder finished first
                if not (entry / TOKENS).is_file():
                    raise
            _sync_folder(entry.parent)
        finally:
            os.close(writing)
            for folder in (unlocked, tmp):
                shutil.rmtree(folder, ignore_errors=True)
        return n

    def _separator_tokens(self, tokenizer: Tokenizer) -> list[np.ndarray]:
        """data.separator's tokens, put before each file but the first ([] for none)."""
        d = self.config.data
        try:
            return list(encode_pieces(tokenizer, [d.separator] if d.separator else []))
        except UncoveredText as e:
            raise UsageError(f"data.separator: {e} (data.tokenizer {d.tokenizer}); choose another separator or "
                             f"tokenizer") from None

    # ---- splits and loaders ------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        entry = self._prepared_entry()
        with _readable(entry):
            if not (entry / TOKENS).is_file():
                raise RuntimeError(f"no tokenized corpus at {entry}: call prepare_data() before setup()")
            for name in (TOKENS, TOKENIZER):  # tokens.bin is read later, by the loaders: refused now
                open(entry / name, "rb").close()
            # prepare_data() read it in this process when it found the entry whole; other ranks read it here
            self.tokenizer, damage = (self.tokenizer, "") if self.cache_hit else _read_tokenizer(entry)
            size = (entry / TOKENS).stat().st_size
            recorded = _recorded(entry)
        self.cache_path = entry
        _, self.tokens_digest, boundary = recorded
        dtype = token_dtype(self.tokenizer.vocab_size) if self.tokenizer is not None else np.uint8
        damage = damage or _damage(entry, recorded, split=bool(self.config.data.val_path)) or \
            (size % np.dtype(dtype).itemsize and f"{TOKENS} ends inside a token")
        if damage:  # on a rank that found it so after rank 0 prepared it
            raise UsageError(f"data.cache_dir: the cache entry {entry} is damaged ({damage}): delete it and run "
                             f"again to tokenize the corpus afresh")
        self._check_same_tokens_on_every_rank()
        n = size // np.dtype(dtype).itemsize
        d, bs = self.config.data, self.config.model.block_size
        n_train = boundary if d.val_path else n - int(n * d.val_fraction)
        n_val = n - n_train
        for split, size in (("training", n_train), ("validation", n_val)):
            if size < bs + 1 and d.val_path:
                setting = "data.path" if split == "training" else "data.val_path"
                raise UsageError(f"{setting}: the {split} text is {size} tokens, shorter than one window of "
                                 f"model.block_size+1 = {bs + 1} tokens: lower model.block_size or use more text")
            if size < bs + 1:
                raise UsageError(
                    f"the corpus has {n} tokens, so its {split} split ({size} tokens at "
                    f"data.val_fraction={d.val_fraction}) is shorter than one window of model.block_size+1 = "
                    f"{bs + 1} tokens: lower model.block_size, adjust data.val_fraction or use more text"
                )
        # training windows tile the tokens with a block's worth of slack, for EpochShifts to move them by
        windows = max(1, (n_train - bs) // bs)
        max_shift = min(bs - 1, n_train - 1 - windows * bs)
        self.train_set = TokenWindows(entry / TOKENS, dtype, 0, n_train, bs, windows, max_shift)
        self.val_set = TokenWindows(entry / TOKENS, dtype, n_train, n, bs, (n_val - 1) // bs)

    def _prepared_entry(self) -> Path:
        """The cache entry to read: the one prepare_data() found in this process, else, with the corpus's digest,
        the one it found in this node's first process, where the engine runs it alone; a process whose node ran
        no prepare_data() (a tool) hashes the corpus itself. Every rank calls it: each hashing the corpus, a node
        of 8 processes read a corpus of many GB 7 times more, at once, just to name the entry."""
        host = socket.gethostname()
        found = D.gather((host, D.env_ranks()[2], str(self.cache_path), self.corpus_digest) if self.cache_path
                         else None)
        # by host, not by rank: a launcher may number a node's processes otherwise than one after the other
        first_of_node = next((f for f in found if f is not None and f[:2] == (host, 0)), None)
        if self.cache_path is None and first_of_node is not None:
            self.cache_path, self.corpus_digest = Path(first_of_node[2]), first_of_node[3]
        return self.cache_path or self._cache_entry(*self._files())

    def _check_same_tokens_on_every_rank(self) -> None:
        """Refuse, on every rank, ranks whose tokens differ: each node reads and tokenizes its own copy of the
        corpus, and a node given other files under the same path (or another Python's standard library, the
        default corpus) would train on other text with no error, where the vocabulary comes out the same size."""
        every = D.gather(self.tokens_digest)
        other = next((rank for rank, tokens in enumerate(every) if tokens != every[0]), None)
        if other is not None:
            d = self.config.data
            raise UsageError(f"data: rank {other} tokenized another corpus than rank 0 (data.path "
                             f"{d.path or 'the default corpus'}, data.tokenizer {d.tokenizer}): its files or their "
                             f"tokens differ; give every node the same text, tokenizer and version of llm")

    def train_dataloader(self, rank: int, world_size: int) -> tuple[DataLoader, DistributedSampler]:
        return self.build_dataloader(self.train_set, rank, world_size, train=True, collate_fn=already_batched,
                                     sampler_class=EpochShifts)

    def val_dataloader(self, rank: int, world_size: int) -> tuple[DataLoader, DistributedSampler]:
        return self.build_dataloader(self.val_set, rank, world_size, train=False, collate_fn=already_batched)


@contextlib.contextmanager
def _readable(entry: Path) -> Iterator[None]:
    """A cache entry this user may not read (another user's, in a shared cache folder) is one line, not a
    traceback: nor can it be tokenized again there."""
    try:
        yield
    except PermissionError as e:
        raise UsageError(f"data.cache_dir: cannot read the cache entry {entry}: {e.strerror}: {e.filename}; make "
                         f"it readable, or choose another cache folder with --data-cache-dir DIR") from None


def _recorded(entry: Path) -> tuple[int | None, str | None, int | None]:
    """What the writer of ``entry`` recorded in tokens.size: the size of tokens.bin, its sha256 and, with
    data.val_path, the token where validation begins (None for what is not there: a file lost, or left empty or
    garbled by a crash of the machine)."""
    try:
        fields = (entry / SIZE).read_bytes().decode("ascii").split()
        size = int(fields[0]) if fields else None
        boundary = int(fields[2]) if len(fields) > 2 else None
    except PermissionError:  # another user's entry: see _readable
        raise
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None, None, None
    return size, fields[1] if len(fields) > 1 else None, boundary


def _damage(entry: Path, recorded: tuple[int | None, str | None, int | None] | None = None,
            split: bool = False) -> str:
    """Why ``entry``'s tokens.bin is not what was written ("" if it is, or if there is none to judge): no size and
    digest recorded beside it (``recorded``, _recorded's, read here if not given: every writer of an entry at a
    key of this CACHE_FORMAT records them), not that size, or, with ``split`` (data.val_path), no record of where
    validation begins."""
    recorded = _recorded(entry) if recorded is None else recorded
    written = recorded[0]
    try:
        size = (entry / TOKENS).stat().st_size
    except OSError:
        return ""
    if written is None or recorded[1] is None:
        return f"{SIZE} is missing or garbled"
    if split and recorded[2] is None:
        return f"{SIZE} holds no start of validation"
    return "" if size == written else f"{TOKENS} holds {size:,} bytes of the {written:,} written"


def _sync_folder(folder: Path) -> None:
    """Put ``folder``'s entries on disk where that can be done: a shared cache folder may be write-only to this
    user (mode 1733), and some file systems sync no folder; the entry is whole either way."""
    with contextlib.suppress(OSError):
        fsync(folder)


def _read_tokenizer(entry: Path) -> tuple[Tokenizer | None, str]:
    """``entry``'s tokenizer, or None and why its tokenizer.json cannot be read as one (none there: no reason)."""
    if not (entry / TOKENIZER).is_file():
        return None, ""
    open(entry / TOKENIZER, "rb").close()  # one this user may not read is no damage: see _readable
    try:
        return load_tokenizer(entry / TOKENIZER), ""
    except UsageError:
        return None, f"its {TOKENIZER} is not a tokenizer file"


NEW_FOLDER_AGE_S = 3600.0
"""How old a cache entry's folder still under the name it is made under must be for _remove_abandoned to take it
for abandoned: its writer takes it over within moments."""


def _remove_abandoned(cache_dir: Path) -> None:
    """Delete what tokenizations on this machine left half-written when their process was killed: their
    folders (``.<key>.<host>.<pid>.<random>``) would otherwise hold a partial token file for good. A folder
    whose lock is free has no writer, whatever pid namespace it ran in; another machine's is left alone,
    since a lock on a shared file system may not reach across machines. A folder still under the name it is
    made and locked under (``.new``), which a writer killed at once leaves, is deleted only once NEW_FOLDER_AGE_S
    old: a young one may be about to be locked."""
    for tmp in cache_dir.glob(".*"):
        made = tmp.name.endswith(".new")
        name = tmp.name[1:].removesuffix(".new").partition(".")[2].rsplit(".", 2)  # host, pid, random
        if len(name) != 3 or name[0] != socket.gethostname():
            continue
        with contextlib.suppress(OSError):
            if made and time.time() - tmp.stat().st_mtime < NEW_FOLDER_AGE_S:
                continue
        try:
            lock = os.open(tmp / WRITING, os.O_RDWR)
        except OSError:  # none: not an entry being written, or one about to be renamed into place
            if made:  # or one whose writer was killed before it made its lock
                shutil.rmtree(tmp, ignore_errors=True)
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its writer is at work
            continue
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            os.close(lock)


def _length(size: int) -> bytes:
    """A file's length as hashed before its bytes, by _hash_file and by the reads checked against it: file
    boundaries are part of the content."""
    return size.to_bytes(8, "little")


def _hash_file(h: Any, path: Path) -> None:
    """Add the file's length, then its bytes, to the hash ``h``, reading a block at a time."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(_length(size))
        for block in iter(lambda: f.read(_BLOCK_BYTES), b""):
            h.update(block)
            size -= len(block)
    if size:
        raise UsageError(f"data.path: {path} changed while it was read; run again once it is written")


class _Both:
    """Two hashes given the same bytes."""

    def __init__(self, first: Any, second: Any):
        self.first, self.second = first, second

    def update(self, data: bytes) -> None:
        self.first.update(data)
        self.second.update(data)


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    """Lists of ``n`` items (the last may hold fewer); itertools.batched from Python 3.12."""
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _pieces(blocks: Iterable[str], size: int = _CHUNK_CHARS) -> Iterator[str]:
    """The text of ``blocks`` joined, as pieces of about ``size`` characters: the same pieces however the text
    is split into blocks.

    Each is cut at the last point in its second half of the first kind of :data:`_CUTS` it holds, where no
    pre-token of the byte, char or bpe tokenizers (nor of GPT-2's or a WordPiece's tokenizer file) spans:
    they join a run of whitespace with what follows it, never with what comes before, so the tokens are those
    of the whole text whatever the size of the pieces (a cut after a newline split indented code otherwise).
    Llama 3's and Qwen's also join punctuation with the newlines after it: the kinds taken first suit them too,
    the last (a newline after punctuation, with whitespace after it: indented CJK prose) does not. A tokenizer
    file of another kind (one that marks the start of each text, SentencePiece's) may tokenize the cuts
    otherwise. With no such point, a piece is cut after its last newline, else at ``size``."""
    buffer = ""
    for block in blocks:
        buffer += block
        while len(buffer) > size:  # there is text after this piece: cut it
            stop = _last_cut(buffer, size)
            if stop is None:
                newline = buffer.rfind("\n", 0, size)
                stop = newline + 1 if newline > 0 else size
            yield buffer[:stop]
            buffer = buffer[stop:]
    if buffer:
        yield buffer


def _last_cut(buffer: str, size: int) -> int | None:
    """The last point of the first kind of :data:`_CUTS` in ``buffer``'s second half of ``size``, if any."""
    for kind in _CUTS:
        last = None
        for last in kind.finditer(buffer, size // 2, size + 1):
            pass
        if last is not None:
            return last.start()
    return None


_CUTS = (re.compile(r"(?<=[^\W_])[ \t\r\n]"), re.compile(r"(?<=\S)[ \t]"), re.compile(r"(?<=\S\n)(?=\S)"),
         re.compile(r"(?<=\S)[\r\n]"))
"""Where _pieces cuts, the first kind a piece's second half holds: before an ASCII whitespace after a letter or
a digit; before a space or a tab after any other text; after a lone newline between text (a run of them GPT-2's
pre-tokenizer splits otherwise); before a newline after text (which Llama 3's and Qwen's tokenizer files join
with punctuation before it: ``.\\n``)."""
