import fcntl
import hashlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from llm.data import text_data_module as tdm
from llm.data.text_data_module import TextDataModule, corpus_files, default_corpus_files, token_dtype
from llm.data.tokenizers import CharTokenizer, HFTokenizer, Tokenizer
from llm.errors import UsageError
from llm.training.core import distributed as D
from llm.training.core.config import Config
from tests.helpers import free_port, spawn

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(40))  # 2130 chars
BS = 16


def make(tmp_path, path, **data) -> TextDataModule:
    config = Config.from_dict({
        "data": {"path": str(path), "cache_dir": str(tmp_path / "cache"), "tokenizer": "char", **data},
        "model": {"block_size": BS}, "training": {"batch_size": 4, "seed": 3},
    })
    return TextDataModule(config)


def ready(tmp_path, path, **data) -> TextDataModule:
    dm = make(tmp_path, path, **data)
    dm.prepare_data()
    dm.setup()
    return dm


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def tokens_of(dm) -> np.ndarray:
    return np.fromfile(dm.cache_path / "tokens.bin", dtype=np.uint16)


def test_the_corpus_is_tokenized_into_a_cached_token_file(tmp_path, corpus):
    dm = ready(tmp_path, corpus)
    assert isinstance(dm.tokenizer, CharTokenizer) and dm.tokenizer.decode(tokens_of(dm).tolist()) == TEXT
    assert sorted(p.name for p in dm.cache_path.iterdir()) == ["tokenizer.json", "tokens.bin", "tokens.size"]
    size, digest = (dm.cache_path / "tokens.size").read_text().split()  # what was written, to tell damage by
    assert int(size) == (dm.cache_path / "tokens.bin").stat().st_size
    assert digest == dm.tokens_digest == hashlib.sha256((dm.cache_path / "tokens.bin").read_bytes()).hexdigest()
    assert dm.cache_path.parent == tmp_path / "cache"
    umask = os.umask(0)
    os.umask(umask)
    assert dm.cache_path.stat().st_mode & 0o777 == 0o777 & ~umask  # readable by others who share the cache


def test_validation_is_the_last_fraction_in_consecutive_windows(tmp_path, corpus):
    dm = ready(tmp_path, corpus, val_fraction=0.25)
    tokens = tokens_of(dm)
    n_val = int(len(tokens) * 0.25)
    val = tokens[-n_val:]
    assert len(dm.val_set) == (n_val - 1) // BS
    for i in range(len(dm.val_set)):
        x, y = dm.val_set[i]
        assert x.tolist() == val[i * BS:(i + 1) * BS].tolist()
        assert y.tolist() == val[i * BS + 1:(i + 1) * BS + 1].tolist()


def test_training_windows_are_shifted_pairs_from_the_training_split(tmp_path, corpus):
    dm = ready(tmp_path, corpus, val_fraction=0.25)
    tokens = tokens_of(dm)
    train = tokens[:len(tokens) - int(len(tokens) * 0.25)]
    windows = dm.train_set
    assert len(windows) == len(train) // BS - 1 and windows.max_shift == BS - 1
    for i in range(len(windows) * BS):  # each window, moved by each shift an epoch may draw
        x, y = windows[i]
        o = i % len(windows) * BS + i // len(windows)
        assert o + BS + 1 <= len(train)  # never reaches into validation
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (BS,)
        assert x.tolist() == train[o:o + BS].tolist() and y.tolist() == train[o + 1:o + BS + 1].tolist()
    batch = list(range(0, len(windows) * BS, 7))  # the loader's way: a batch in one call
    xs, ys = windows.__getitems__(batch)
    assert xs.tolist() == [windows[i][0].tolist() for i in batch] and ys.tolist() == [windows[i][1].tolist() for i in batch]
    for outside in (len(windows) * BS, -1):
        with pytest.raises(IndexError):
            windows[outside]
        with pytest.raises(IndexError):
            windows.__getitems__([0, outside])


def test_a_training_split_of_one_window_shifts_only_within_its_tokens(tmp_path, corpus):
    dm = ready(tmp_path, corpus, val_fraction=1 - (BS + 5) / len(TEXT))  # 21 training tokens: one window of 17
    assert len(dm.train_set) == 1 and dm.train_set.max_shift == 4
    assert dm.train_set[4][1].tolist() == tokens_of(dm)[5:BS + 5].tolist()


def epoch_inputs(dm, epoch, rank=0, world_size=1) -> list[tuple[int, list[int]]]:
    """The windows the training loader of ``rank`` reads in ``epoch``: (where each starts, its inputs)."""
    _, sampler = dm.train_dataloader(rank=rank, world_size=world_size)
    sampler.set_epoch(epoch)
    n = len(dm.train_set)
    return [(i % n * BS + i // n, dm.train_set[i][0].tolist()) for i in sampler]


def test_each_epoch_reads_every_training_token_once_but_its_edges_moved_by_a_shift_of_its_own(tmp_path, corpus):
    dm = ready(tmp_path, corpus, val_fraction=0.25)
    train = tokens_of(dm)[:len(dm.train_set.tokens)]
    shifts = set()
    for epoch in range(8):
        windows = sorted(epoch_inputs(dm, epoch))
        shift = windows[0][0]
        read = [token for _, x in windows for token in x]  # in the order of the text: each window's inputs
        assert read == train[shift:shift + len(read)].tolist()  # every token from the shift on, once
        assert len(train) - len(read) < 2 * BS  # all but the edges
        shifts.add(shift)
    assert len(shifts) > 2  # the edges move from epoch to epoch


def test_training_windows_depend_only_on_the_seed_and_the_epoch_and_are_split_between_ranks(tmp_path, corpus):
    a, b = ready(tmp_path, corpus), ready(tmp_path, corpus)
    assert epoch_inputs(a, 2) == epoch_inputs(b, 2) != epoch_inputs(a, 3)
    ranks = [epoch_inputs(a, 2, rank, world_size=2) for rank in range(2)]
    assert not {o for o, _ in ranks[0]} & {o for o, _ in ranks[1]}  # one shift for both: no window read twice
    assert len(ranks[0]) + len(ranks[1]) >= len(a.train_set) - 1
    c = make(tmp_path, corpus)
    c.config.training.seed = 4
    c.setup()
    assert epoch_inputs(a, 2) != epoch_inputs(c, 2)


def test_loaders_batch_the_windows(tmp_path, corpus):
    dm = ready(tmp_path, corpus)
    loader, sampler = dm.train_dataloader(rank=0, world_size=1)
    x, y = next(iter(loader))
    assert x.shape == y.shape == (4, BS) and x.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    # the whole-batch gather returns the sampler's windows, each as __getitem__ gives it
    first = list(sampler)[:4]
    assert torch.equal(x, torch.stack([dm.train_set[i][0] for i in first]))
    assert torch.equal(y, torch.stack([dm.train_set[i][1] for i in first]))
    val_loader, _ = dm.val_dataloader(rank=0, world_size=1)
    assert sum(len(x) for x, _ in val_loader) == len(dm.val_set)


def test_a_second_run_reuses_the_cache(tmp_path, corpus):
    first = make(tmp_path, corpus)
    first.prepare_data()
    assert not first.cache_hit
    tokens = first.cache_path / "tokens.bin"
    stamp = tokens.stat().st_mtime_ns
    second = make(tmp_path, corpus)
    second.prepare_data()
    assert second.cache_hit and second.cache_path == first.cache_path
    assert tokens.stat().st_mtime_ns == stamp
    # an entry missing its token file is rebuilt, not trusted
    tokens.unlink()
    second.prepare_data()
    assert not second.cache_hit and tokens.is_file()
    # other text or another tokenizer: another entry
    corpus.write_text(TEXT + "more\n")
    third = make(tmp_path, corpus)
    third.prepare_data()
    fourth = make(tmp_path, corpus, tokenizer="byte")
    fourth.prepare_data()
    assert not third.cache_hit and not fourth.cache_hit
    assert len({first.cache_path, third.cache_path, fourth.cache_path}) == 3


def test_a_damaged_cache_entry_is_tokenized_again_not_trusted(tmp_path, corpus):
    first = make(tmp_path, corpus, tokenizer="byte")
    first.prepare_data()
    tokens = first.cache_path / "tokens.bin"
    whole = tokens.read_bytes()
    for cut in (1001, 1000):  # inside a token, and at a token's end: fewer tokens, silently
        tokens.write_bytes(whole[:cut])
        again = make(tmp_path, corpus, tokenizer="byte")
        with pytest.warns(UserWarning, match=rf"cache entry .*{first.cache_path.name} is damaged \(tokens.bin holds "
                                             rf"{cut:,} bytes of the {len(whole):,} written\): tokenizing again"):
            again.prepare_data()
        assert not again.cache_hit and tokens.read_bytes() == whole
    # a rank that finds it damaged after rank 0 prepared it: one line
    tokens.write_bytes(whole[:1001])
    with pytest.raises(UsageError, match=r"^data.cache_dir: the cache entry .* is damaged \(tokens.bin holds 1,001 "
                                         r"bytes of the .* written\): delete it and run again"):
        make(tmp_path, corpus, tokenizer="byte").setup()
    # its record of the size and digest lost or emptied (a machine's crash before the record reached the disk)
    size = first.cache_path / "tokens.size"
    for record in (None, "", "garbled\n"):
        size.unlink() if record is None else size.write_text(record)
        with pytest.raises(UsageError, match=r"is damaged \(tokens.size is missing or garbled\): delete it"):
            make(tmp_path, corpus, tokenizer="byte").setup()
        again = make(tmp_path, corpus, tokenizer="byte")
        with pytest.warns(UserWarning, match=r"is damaged \(tokens.size is missing or garbled\): tokenizing again"):
            again.prepare_data()
        assert not again.cache_hit and tokens.read_bytes() == whole


def test_a_cache_entry_whose_tokenizer_is_damaged_is_tokenized_again_or_named_in_one_line(tmp_path, corpus):
    first = make(tmp_path, corpus, tokenizer="byte")
    first.prepare_data()
    tokenizer = first.cache_path / "tokenizer.json"
    whole = tokenizer.read_bytes()
    tokenizer.write_bytes(whole[: len(whole) // 2])
    on_a_rank = make(tmp_path, corpus, tokenizer="byte")  # one that finds it so after rank 0 prepared it
    with pytest.raises(UsageError, match=r"^data.cache_dir: the cache entry .* is damaged \(its tokenizer.json is not "
                                         r"a tokenizer file\): delete it and run again"):
        on_a_rank.setup()
    again = make(tmp_path, corpus, tokenizer="byte")
    with pytest.warns(UserWarning, match=r"is damaged \(its tokenizer.json is not a tokenizer file\): tokenizing again"):
        again.prepare_data()
    assert not again.cache_hit and tokenizer.read_bytes() == whole


def test_an_entry_that_does_not_say_where_its_validation_begins_is_tokenized_again(tmp_path, corpus):
    held = tmp_path / "held.txt"
    held.write_text(TEXT[:600])
    dm = ready(tmp_path, corpus, val_path=str(held))
    size = dm.cache_path / "tokens.size"
    size.write_text("\n".join(size.read_text().split("\n")[:2]) + "\n")  # the split's line lost
    with pytest.warns(UserWarning, match="is damaged \\(tokens.size holds no start of validation\\): tokenizing"):
        again = ready(tmp_path, corpus, val_path=str(held))
    assert again.val_set.tokens.tolist() == dm.val_set.tokens.tolist()


def test_a_damaged_entry_another_node_deletes_at_the_same_time_is_rebuilt(tmp_path, corpus, monkeypatch):
    first = make(tmp_path, corpus, tokenizer="byte")
    first.prepare_data()
    tokens = first.cache_path / "tokens.bin"
    whole = tokens.read_bytes()
    tokens.write_bytes(whole[:-2])
    rmtree = tdm.shutil.rmtree

    def raced(path, *args, **kwargs):  # another node sharing the cache deletes the damaged entry first
        if Path(path) == first.cache_path and Path(path).exists():
            rmtree(path)
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(tdm.shutil, "rmtree", raced)
    again = make(tmp_path, corpus, tokenizer="byte")
    with pytest.warns(UserWarning, match="is damaged"):
        again.prepare_data()
    assert tokens.read_bytes() == whole


def test_an_entry_another_node_renames_into_place_after_this_one_found_none_is_kept(tmp_path, corpus, monkeypatch):
    other, here = make(tmp_path, corpus, tokenizer="byte"), make(tmp_path, corpus, tokenizer="byte")
    damage, removed = tdm._damage, []

    def other_node_finishes(entry, *args, **kwargs):  # between this node's look at the cache and what it does next
        found = damage(entry, *args, **kwargs)
        if not other.cache_path:
            other.prepare_data()
        return found

    monkeypatch.setattr(tdm, "_damage", other_node_finishes)
    monkeypatch.setattr(tdm.shutil, "rmtree", lambda path, *args, **kwargs: removed.append(Path(path)))
    here.prepare_data()
    assert not here.cache_hit and here.cache_path == other.cache_path
    assert other.cache_path not in removed  # the other node's ranks read it in their setup() now
    assert damage(other.cache_path) == "" and tokens_of(other).tolist() == list(corpus.read_bytes())


def corpus_worker(rank: int, directory: str, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=20))
    try:
        outcomes = []
        # each node its own copy of the corpus and its own cache: the same text, then another on rank 1, as long
        # and with the same vocabulary, so that nothing else would tell
        for i, text in enumerate((TEXT, TEXT.replace("fox", "cat") if rank else TEXT)):
            node = Path(directory, f"node{rank}_{i}")
            node.mkdir()
            (node / "corpus.txt").write_text(text)
            dm = make(node, node / "corpus.txt", tokenizer="byte")
            dm.prepare_data()
            try:
                dm.setup()
                outcomes.append("same")
            except UsageError as e:
                outcomes.append(str(e))
        Path(directory, f"corpus_{rank}.json").write_text(json.dumps(outcomes))
    finally:
        D.destroy_process_group()


def test_ranks_whose_copies_of_the_corpus_differ_are_refused_in_one_line_on_every_rank(tmp_path):
    spawn(corpus_worker, str(tmp_path), free_port())
    for rank in (0, 1):
        same, differ = json.loads((tmp_path / f"corpus_{rank}.json").read_text())
        assert same == "same"
        assert re.fullmatch(rf"data: rank 1 tokenized another corpus than rank 0 \(data.path \S+node{rank}_1/corpus.txt, "
                            r"data.tokenizer byte\): its files or their tokens differ; give every node the same text, "
                            r"tokenizer and version of llm", differ), differ


def node_worker(rank: int, directory: str, port: int) -> None:
    """Two processes of one node, as torchrun starts them: the first prepares the data, then both set it up."""
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=20))
    try:
        hashed = []
        real = tdm._hash_file
        tdm._hash_file = lambda digest, path: (hashed.append(str(path)), real(digest, path))[1]
        dm = make(Path(directory), Path(directory, "corpus.txt"), tokenizer="byte")
        if rank == 0:
            dm.prepare_data()
        dist.barrier()
        dm.setup()
        Path(directory, f"node_{rank}.json").write_text(json.dumps(
            {"hashed": hashed, "entry": str(dm.cache_path), "digest": dm.corpus_digest, "n": len(dm.train_set)}))
    finally:
        D.destroy_process_group()


def test_the_processes_of_a_node_read_the_entry_its_first_one_prepared_without_hashing_the_corpus_again(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT)
    spawn(node_worker, str(tmp_path), free_port())
    first, second = (json.loads((tmp_path / f"node_{rank}.json").read_text()) for rank in (0, 1))
    assert first["hashed"] == [str(tmp_path / "corpus.txt")] and second["hashed"] == []
    assert second == {**first, "hashed": []} and first["digest"]  # the digest corpus.json records, on each


def test_a_cache_folder_inside_the_data_folder_is_not_read_as_text(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text(TEXT)
    config = Config.from_dict({"data": {"path": str(data), "cache_dir": str(data / "cache"), "tokenizer": "char"},
                               "model": {"block_size": BS}})
    first = TextDataModule(config)
    first.prepare_data()
    second = TextDataModule(config)
    second.prepare_data()
    assert second.cache_hit and second.cache_path == first.cache_path
    assert len(list((data / "cache").iterdir())) == 1
    # another run's cache in the data folder, this one's elsewhere: tokens still, not text
    elsewhere = Config.from_dict({"data": {"path": str(data), "cache_dir": str(tmp_path / "other"), "tokenizer": "char"},
                                  "model": {"block_size": BS}})
    third = TextDataModule(elsewhere)
    third.prepare_data()
    assert third.cache_path.name == first.cache_path.name  # the key hashes the corpus: the same text, a.txt alone
    for spec in (data / "cache", data / "cache" / "*" / "*"):
        only_cache = Config.from_dict({"data": {"path": str(spec), "cache_dir": str(tmp_path / "other")}})
        with pytest.raises(UsageError, match=r"(holds|matches) no files.*, only token caches$"):
            TextDataModule(only_cache).prepare_data()
    entry = Config.from_dict({"data": {"path": str(first.cache_path), "cache_dir": str(tmp_path / "other")}})
    with pytest.raises(UsageError, match=r"is a token cache entry \(tokens.bin\), not text"):
        TextDataModule(entry).prepare_data()
    # the other way round, text inside the cache folder, is text
    inside = Config.from_dict({"data": {"path": str(data / "a.txt"), "cache_dir": str(data), "tokenizer": "char"},
                               "model": {"block_size": BS}})
    dm = TextDataModule(inside)
    dm.prepare_data()
    assert dm.cache_path.parent == data and (dm.cache_path / "tokens.bin").stat().st_size == 2 * len(TEXT)


def test_what_runs_wrote_inside_the_data_folder_is_not_read_as_text(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    checkpoint = ["step_00000010/manifest.json", "step_00000010/state.pt"]
    written = {  # a run folder by its config.yaml beside its log, its summary or its checkpoints; or by its lock
        "runs/finished": ["config.yaml", "summary.json"], "runs/logging": ["config.yaml", "metrics.jsonl"],
        "runs/training": [".llm.lock", "config.yaml"],
        "runs/saved": ["config.yaml", *(f"checkpoints/{name}" for name in checkpoint)],
        "runs/charted": ["config.yaml", "events.out.tfevents.1796470451.host.1.0"],  # TensorBoard alone
        "ckpts": checkpoint,  # a checkpoint folder of its own (--checkpoint-dir ckpts)
        "papers": ["paper.txt", "summary.json"],  # the user's: a summary.json alone is data like any other
        "notes": ["config.yaml", "todo.txt"],
    }
    for folder, names in written.items():
        for name in names:
            (tmp_path / folder / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / folder / name).write_text("x\n")
    assert [p.relative_to(tmp_path).as_posix() for p in corpus_files(str(tmp_path))] == [
        "a.txt", "notes/config.yaml", "notes/todo.txt", "papers/paper.txt", "papers/summary.json"]
    for folder in ("runs/charted", "runs/saved/checkpoints", "ckpts/step_00000010"):  # named itself: refused
        with pytest.raises(UsageError, match=rf"^data.path: {tmp_path / folder} is what a training run wrote"):
            corpus_files(str(tmp_path / folder))
    assert [p.name for p in corpus_files(str(tmp_path / "papers"))] == ["paper.txt", "summary.json"]


def test_a_crash_while_tokenizing_leaves_no_cache(tmp_path, corpus, monkeypatch):
    def boom(self, text):
        raise KeyboardInterrupt
    monkeypatch.setattr(CharTokenizer, "encode", boom)
    dm = make(tmp_path, corpus)
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    dm.prepare_data()
    assert not dm.cache_hit and (dm.cache_path / "tokens.bin").is_file()


def test_what_a_killed_tokenization_left_is_deleted_by_the_next_one_on_the_machine(tmp_path, corpus):
    killed = subprocess.run([sys.executable, "-c", f"""
import os, signal
from llm.data.tokenizers import CharTokenizer
from tests.data.test_text_data_module import make
from pathlib import Path
CharTokenizer.encode_batch = lambda self, texts: os.kill(os.getpid(), signal.SIGKILL)
make(Path({str(tmp_path)!r}), Path({str(corpus)!r})).prepare_data()
"""], cwd=Path(__file__).parents[2], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    [left] = (tmp_path / "cache").iterdir()  # half-written, by a process that is gone
    assert left.name.startswith(".") and (left / "tokenizer.json").is_file()
    host, gone = socket.gethostname(), int(left.name.rsplit(".", 2)[1])  # a pid no process has now, likely

    def folder(name: str, made: str = "") -> Path:  # made: ".new", the name a writer makes it under
        path = tmp_path / "cache" / f".{'0' * 32}.{name}.0000{made}"
        path.mkdir()
        (path / tdm.WRITING).touch()
        return path

    at_work = folder(f"{host}.{gone}")  # its pid means nothing here (another pid namespace): its lock is held
    lock = os.open(at_work / tdm.WRITING, os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)
    kept = [at_work, folder(f"other-host.{gone}"), folder(f"{host}.cluster.{gone}")]  # other machines' folders
    # still under the name a writer makes it under (.new): killed before or after it made its lock file, an
    # hour ago; a young one may be about to be locked, and stays
    made_long_ago = [folder(f"{host}.{gone}", ".new"), folder(f"{host}.{gone + 1}", ".new")]
    (made_long_ago[1] / tdm.WRITING).unlink()
    for path in made_long_ago:
        os.utime(path, (time.time() - tdm.NEW_FOLDER_AGE_S - 60,) * 2)
    kept.append(folder(f"{host}.{gone + 2}", ".new"))
    try:
        dm = make(tmp_path, corpus)
        dm.prepare_data()
    finally:
        os.close(lock)
    assert sorted((tmp_path / "cache").iterdir()) == sorted([dm.cache_path, *kept])
    assert sorted(p.name for p in dm.cache_path.iterdir()) == ["tokenizer.json", "tokens.bin", "tokens.size"]


def test_a_tokenization_that_starts_beside_another_never_deletes_its_folder(tmp_path, corpus, monkeypatch):
    # another process cleaning up (one tokenizing another corpus into the same folder) at the worst moment: after
    # this one made its folder and before it took the lock; it passes over a folder not yet under its own name
    locked, real_flock = [], fcntl.flock

    def flock(fd, operation):
        if not locked:  # the writer's lock, about to be taken: the other process's clean-up comes first
            locked.append(operation)
            tdm._remove_abandoned(tmp_path / "cache")
        return real_flock(fd, operation)

    monkeypatch.setattr(tdm.fcntl, "flock", flock)
    dm = make(tmp_path, corpus)
    dm.prepare_data()
    assert locked and sorted(p.name for p in dm.cache_path.iterdir()) == ["tokenizer.json", "tokens.bin", "tokens.size"]
    assert list((tmp_path / "cache").iterdir()) == [dm.cache_path]


def test_a_byte_order_mark_at_the_start_of_each_file_is_left_out(tmp_path):
    root = tmp_path / "texts"
    root.mkdir()
    for name in ("a.txt", "b.txt"):  # saved by an editor that marks UTF-8 files
        (root / name).write_bytes(b"\xef\xbb\xbf" + f"{name} says hello\n".encode() * 30)
    dm = ready(tmp_path, root)
    assert "\ufeff" not in dm.tokenizer.chars
    assert dm.tokenizer.decode(tokens_of(dm).tolist()) == "a.txt says hello\n" * 30 + "b.txt says hello\n" * 30


def test_folders_and_globs_are_read_recursively_in_sorted_order(tmp_path):
    root = tmp_path / "texts"
    (root / "b").mkdir(parents=True)
    (root / ".git").mkdir()
    for name, text in {"b/2.txt": "second\n" * 40, "a.txt": "first\n" * 40, "b/1.md": "middle\n" * 40,
                       ".hidden": "no", ".git/x": "no"}.items():
        (root / name).write_text(text)
    assert [p.relative_to(root).as_posix() for p in corpus_files(str(root))] == ["a.txt", "b/1.md", "b/2.txt"]
    assert [p.name for p in corpus_files(str(root / "**" / "*.txt"))] == ["a.txt", "2.txt"]
    dm = ready(tmp_path, root, val_fraction=0.2)
    assert dm.tokenizer.decode(tokens_of(dm).tolist()) == "first\n" * 40 + "middle\n" * 40 + "second\n" * 40


@pytest.mark.filterwarnings("ignore:data.vocab_size")  # a corpus too small for the vocabulary asked
@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_the_separator_stands_between_files_and_a_bpe_trained_here_takes_it_as_one_token(tmp_path, tokenizer):
    root = tmp_path / "texts"
    root.mkdir()
    texts = {"a.txt": "first words\n" * 40, "b.txt": "middle words\n" * 40, "c.txt": "last words\n" * 40}
    for name, text in texts.items():
        (root / name).write_text(text)
    separator = "<|endoftext|>"
    dm = ready(tmp_path, root, tokenizer=tokenizer, vocab_size=300, separator=separator, val_fraction=0.2)
    ids = np.fromfile(dm.cache_path / "tokens.bin", dtype=token_dtype(dm.tokenizer.vocab_size)).tolist()
    assert dm.tokenizer.decode(ids) == separator.join(texts.values())  # between files, not after the last
    if tokenizer == "bpe":
        [one] = dm.tokenizer.encode(separator)
        assert ids.count(one) == 2
        # its text was not counted in training: no merges of it, tokens no text would use
        vocabulary = dm.tokenizer.hf.get_vocab()
        assert [t for t in vocabulary if len(t) > 1 and ("end" in t or "|" in t)] == [separator], vocabulary
    plain = ready(tmp_path, root, tokenizer=tokenizer, vocab_size=300, val_fraction=0.2)
    assert plain.cache_path != dm.cache_path  # another entry: the separator is part of its key
    ids = np.fromfile(plain.cache_path / "tokens.bin", dtype=token_dtype(plain.tokenizer.vocab_size)).tolist()
    assert plain.tokenizer.decode(ids) == "".join(texts.values())


def test_a_separator_the_tokenizer_file_cannot_encode_is_named_where_it_would_stand(tmp_path, corpus):
    first = ready(tmp_path, corpus)  # a char tokenizer of the corpus's characters: no "<"
    tokenizer = str(first.cache_path / "tokenizer.json")
    ready(tmp_path / "one", corpus, tokenizer=tokenizer, separator="<|endoftext|>")  # one file: it stands nowhere
    second = tmp_path / "second.txt"
    second.write_text(TEXT)
    with pytest.raises(UsageError, match=r"^data\.separator: character '<' is not in the char tokenizer's vocab"):
        make(tmp_path / "two", f"{tmp_path}/*.txt", tokenizer=tokenizer, separator="<|endoftext|>").prepare_data()


def test_a_char_tokenizer_takes_the_separators_characters_wherever_it_stands(tmp_path, corpus):
    held = tmp_path / "held.txt"
    held.write_text(TEXT[:600])
    # one training file: the separator stands only between it and the validation text
    dm = ready(tmp_path, corpus, val_path=str(held), separator="<|endoftext|>")
    assert dm.tokenizer.decode(dm.val_set.tokens.tolist()) == "<|endoftext|>" + TEXT[:600]
    assert "<" in ready(tmp_path / "one", corpus, separator="<|endoftext|>").tokenizer.chars


def test_with_no_separator_nor_validation_path_the_cache_key_is_that_of_earlier_versions(tmp_path, corpus):
    dm = make(tmp_path, corpus)
    entry = dm._cache_entry(*dm._files())
    key = hashlib.sha256(f"text-cache-{tdm.CACHE_FORMAT}\0char\0{dm.corpus_digest}".encode()).hexdigest()
    assert entry.name == key[:32]  # their cache entries are read, not tokenized again


def test_a_validation_path_is_the_validation_split_and_its_files_leave_the_training_data(tmp_path):
    root = tmp_path / "texts"
    root.mkdir()
    (root / "a.txt").write_text("first words\n" * 40)
    (root / "b.txt").write_text("second words\n" * 40)
    held = root / "held.txt"  # in the training folder too: left out of it
    held.write_text("second first words\n" * 30)
    dm = ready(tmp_path, root, val_path=str(held), separator="|", val_fraction=0.5)  # val_fraction: not used
    decode = dm.tokenizer.decode
    assert decode(dm.train_set.tokens.tolist()) == "first words\n" * 40 + "|" + "second words\n" * 40
    assert decode(dm.val_set.tokens.tolist()) == "|" + "second first words\n" * 30
    assert len(dm.val_set) == (len(dm.val_set.tokens) - 1) // BS and dm.val_set.max_shift == 0  # consecutive windows
    whole = ready(tmp_path, root, separator="|")
    assert whole.cache_path != dm.cache_path  # another entry: the same files, split otherwise
    # the tokenizer is trained on the training files alone: text with characters they lack is named
    held.write_text("words, held out\n" * 30)
    with pytest.raises(UsageError, match=r"^data\.val_path: .*held\.txt: character ',' is not in the char "
                                         r"tokenizer's vocabulary .*trained on data\.path"):
        ready(tmp_path, root, val_path=str(held), separator="|")
    hard = tmp_path / "hard.txt"  # the same file as held.txt, by a hard link: left out of training too
    held.write_text("second first words\n" * 30)
    os.link(held, hard)
    linked = ready(tmp_path, root, val_path=str(hard), separator="|", val_fraction=0.5)
    assert linked.tokenizer.decode(linked.train_set.tokens.tolist()) == decode(dm.train_set.tokens.tolist())
    with pytest.raises(UsageError, match=r"^data\.val_path: .*nowhere\.txt does not exist"):
        ready(tmp_path, root, val_path=str(root / "nowhere.txt"))
    with pytest.raises(UsageError, match=r"^data\.path: every file of .*texts is one of data\.val_path"):
        ready(tmp_path, root, val_path=str(root))


def test_a_linked_folder_is_read_as_a_glob_reads_it_once_and_a_link_loop_ends(tmp_path):
    root, elsewhere = tmp_path / "texts", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (root / "a.txt").write_text("a\n")
    (root / "sub/b.txt").write_text("b\n")
    (elsewhere / "c.txt").write_text("c\n")
    (root / "books").symlink_to(elsewhere)  # a linked folder: "every file below it" takes its files too
    (root / "sub/loop").symlink_to(root)  # a link back up: read once, not for ever
    walked = [p.relative_to(root).as_posix() for p in corpus_files(str(root))]
    assert walked == ["a.txt", "books/c.txt", "sub/b.txt"]
    (root / "sub/loop").unlink()
    (root / "sub/again.txt").symlink_to(root / "a.txt")  # a second path to a.txt
    os.link(root / "a.txt", root / "sub/hard.txt")  # and a third, a hard link, as data.val_path tells them apart
    assert [p.relative_to(root).as_posix() for p in corpus_files(str(root))] == ["a.txt", "books/c.txt", "sub/b.txt"]
    # a glob reads linked folders too, and ** twice names the same file on several paths: each file once
    globbed = [p.relative_to(root).as_posix() for p in corpus_files(str(root / "**" / "**" / "*.txt"))]
    assert globbed == ["a.txt", "books/c.txt", "sub/b.txt"]


def test_a_file_whose_name_looks_like_a_glob_is_read_as_that_file(tmp_path):
    (tmp_path / "corpus[1].txt").write_text("the file named\n")
    (tmp_path / "corpus1.txt").write_text("what the glob matches\n")
    assert corpus_files(str(tmp_path / "corpus[1].txt")) == [tmp_path / "corpus[1].txt"]
    assert corpus_files(str(tmp_path / "corpus[0-9].txt")) == [tmp_path / "corpus1.txt"]  # no such file: a glob


def test_a_folder_entry_that_is_not_a_file_is_skipped_with_a_warning_and_a_pipe_is_refused(tmp_path):
    root = tmp_path / "texts"
    root.mkdir()
    (root / "a.txt").write_text("text\n")
    (root / "gone.txt").symlink_to(tmp_path / "deleted.txt")  # a broken link: reading it raised FileNotFoundError
    os.mkfifo(root / "pipe.txt")  # reading a pipe that nobody writes waits for ever
    with pytest.warns(UserWarning, match=r"^data.path: skipping 2 entries of .*texts that are not files .* "
                                         r"such as .*gone.txt$"):
        assert corpus_files(str(root)) == [root / "a.txt"]
    with pytest.raises(UsageError, match=r"^data.path: .*pipe.txt is neither a file nor a folder"):
        corpus_files(str(root / "pipe.txt"))


def test_the_default_corpus_is_the_stdlib_sources():
    files = default_corpus_files()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 50 and all(f.suffix == ".py" and f.is_relative_to(stdlib) for f in files)
    assert not any({"site-packages", "test"} & set(f.relative_to(stdlib).parts) for f in files)
    assert files == sorted(files, key=lambda f: tdm._path_hash(f.relative_to(stdlib)))
    # the validation split, the last tenth, is a sample of modules, not the last in the alphabet (codec tables)
    tail = files[len(files) * 9 // 10:]
    assert len({f.relative_to(stdlib).parts[0] for f in tail}) > len(tail) // 2
    assert sum(f.stat().st_size for f in files) <= tdm.DEFAULT_CORPUS_BYTES
    assert default_corpus_files(limit_bytes=1 << 16) == files[:len(default_corpus_files(limit_bytes=1 << 16))]


def test_with_no_path_the_stdlib_sources_are_the_corpus(tmp_path):
    dm = ready(tmp_path, "", val_fraction=0.01)
    files = default_corpus_files()
    text = "".join(f.read_text() for f in files)
    tokens = tokens_of(dm)
    assert len(tokens) == len(text)  # char tokens: one per character
    assert dm.tokenizer.decode(tokens[:5000].tolist()) == text[:5000]


def test_token_dtype_fits_the_vocabulary():
    assert token_dtype(256) is np.uint16 and token_dtype(65536) is np.uint16 and token_dtype(65537) is np.uint32


def test_long_texts_are_tokenized_in_chunks_cut_before_whitespace():
    text = "abc\n" * 10 + "x" * 25
    pieces = list(tdm._pieces([text], size=10))
    assert "".join(pieces) == text and all(len(p) <= 10 for p in pieces)
    # before the last whitespace after a letter in each piece's second half; a piece with none is cut at its size
    assert pieces == ["abc\nabc"] + ["\nabc\nabc"] * 4 + ["\n" + "x" * 9, "x" * 10, "x" * 6]
    # without one, before a space after other text, else after a lone newline between text, else before a newline
    assert list(tdm._pieces(["x.\n,. y" * 6], size=10))[:2] == ["x.\n,.", " yx.\n,."]
    assert list(tdm._pieces([".,\n" * 8], size=10)) == [".,\n.,\n.,\n", ".,\n.,\n.,\n", ".,\n.,\n"]
    assert list(tdm._pieces([".,\n\n" * 6], size=10)) == [".,\n\n.,\n\n.,", "\n\n.,\n\n.,", "\n\n.,\n\n"]
    for cut in range(len(text) + 1):  # however the file's blocks split the text, the pieces are the same
        assert list(tdm._pieces([text[:cut], "", text[cut:]], size=10)) == pieces, cut


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
"""The rule Llama 3's and Qwen's tokenizer files split text into words by: punctuation keeps the newlines after it."""


def llama3_style_bpe(texts: list[str], vocab_size: int) -> HFTokenizer:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return HFTokenizer(tok)


def test_pieces_are_cut_before_whitespace_so_a_bpe_gives_the_tokens_of_the_whole_text():
    # code: GPT-2's pre-tokenizer joins a newline with the indentation after it (and a run of spaces with the word
    # after it), Llama 3's a newline with the punctuation before it; cut inside such a run, the pieces would
    # tokenize otherwise than the whole, and otherwise again with another piece size. A class body has no newline
    # with text on both sides, a CRLF file none at all: each piece is cut after a letter or a digit
    body = "".join(f"    def f{i}(self, x):  \n        return x + {i}\n\n    y{i} = g(x).\n    z = h();\n"
                   for i in range(120))
    texts = ("class A:\n" + body, ("class A:\n" + body).replace("\n", "\r\n"))
    for text, train in itertools.product(texts, (HFTokenizer.train_bpe, llama3_style_bpe)):
        tokenizer = train([text], 300)
        whole = tokenizer.encode(text)
        for size in (50, 150, 400, 1000):
            pieces = list(tdm._pieces([text], size=size))
            assert "".join(pieces) == text and len(pieces) > 1 and max(map(len, pieces)) <= size
            assert all(not p[-1].isspace() and q[0].isspace() for p, q in zip(pieces, pieces[1:]))
            assert np.concatenate(list(tdm.encode_pieces(tokenizer, pieces))).tolist() == whole, size
    # text whose only whitespace is newlines after punctuation (CJK prose, JSON lines) is cut after a lone newline,
    # which both keep; indented, or with the newlines doubled, before a newline, which GPT-2's keeps, Llama 3's not
    lines = ("".join(f"第{i}章。这是一个句子，没有空格。\n" for i in range(300)),
             "".join(f'{{"a":[{i},2]}}\n' for i in range(300)))
    indented = ("".join(f"\u3000\u3000第{i}章。这是一个句子，没有空格。\n" for i in range(300)),  # ideographic spaces
                "[\n" + ",\n".join(f'  "item-{i}"' for i in range(300)) + "\n]\n")
    cases = [*itertools.product(lines, (HFTokenizer.train_bpe, llama3_style_bpe)),
             *itertools.product(indented, (HFTokenizer.train_bpe,))]
    for text, train in cases:
        tokenizer = train([text], 300)
        whole = tokenizer.encode(text)
        for size in (50, 150, 400):
            pieces = list(tdm._pieces([text], size=size))
            assert len(pieces) > 1 and np.concatenate(list(tdm.encode_pieces(tokenizer, pieces))).tolist() == whole


def test_a_file_is_read_in_blocks_and_a_bad_byte_is_named_where_it_is(tmp_path, monkeypatch):
    monkeypatch.setattr(tdm, "_BLOCK_BYTES", 7)  # blocks that cut the two-byte characters in half
    text = "é\nab" * 40
    path = tmp_path / "c.txt"
    path.write_text(text, encoding="utf-8")
    assert list(tdm.read_pieces(path, size=16)) == list(tdm._pieces([text], size=16))
    data = text.encode()
    for at in [*range(30), len(data) - 1]:  # the offset a whole-file decode gives, across block boundaries
        bad = data[:at] + b"\xff" + data[at:]
        path.write_bytes(bad)
        with pytest.raises(UnicodeDecodeError) as whole:
            bad.decode("utf-8")
        with pytest.raises(UsageError, match=rf"is not UTF-8 text \(byte {whole.value.start}\)"):
            list(tdm.read_pieces(path))
    path.write_bytes(data + "é".encode()[:1])  # a character cut short at the end of the file
    with pytest.raises(UsageError, match=rf"is not UTF-8 text \(byte {len(data)}\)"):
        list(tdm.read_pieces(path))
    assert tdm.read_text(path, strict=False) == ""


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_a_corpus_of_many_pieces_is_the_pieces_tokens_in_order(tmp_path, corpus, monkeypatch, tokenizer):
    import functools

    monkeypatch.setattr(tdm, "read_pieces", functools.partial(tdm.read_pieces, size=100))
    for cls in (Tokenizer, HFTokenizer):  # 22 pieces of up to 100 characters: 7 batches of 3, then 1
        monkeypatch.setattr(cls, "pieces_at_once", 3)
    dm = ready(tmp_path, corpus, tokenizer=tokenizer, vocab_size=300)
    pieces = list(tdm._pieces([TEXT], size=100))
    assert len(pieces) == 22 and all(len(p) <= 100 and p[-1].isalpha() for p in pieces[:-1])
    expected = [i for piece in pieces for i in dm.tokenizer.encode(piece)]
    assert tokens_of(dm).tolist() == expected and dm.tokenizer.decode(expected) == TEXT


def test_the_corpus_is_hashed_once_by_the_process_that_prepares_it(tmp_path, corpus, monkeypatch):
    hashed = []
    real = tdm._hash_file
    monkeypatch.setattr(tdm, "_hash_file", lambda h, path: (hashed.append(path), real(h, path)))
    ready(tmp_path, corpus)
    assert hashed == [corpus]
    make(tmp_path, corpus).setup()  # a rank that did not prepare the data finds the entry by the hash
    assert hashed == [corpus, corpus]


def test_a_file_that_grows_while_it_is_hashed_is_named(tmp_path, corpus, monkeypatch):
    import hashlib

    size = corpus.stat().st_size
    monkeypatch.setattr(tdm.os, "fstat", lambda fd: os.stat_result((0,) * 6 + (size - 1,) + (0,) * 3))
    with pytest.raises(UsageError, match=r"corpus.txt changed while it was read"):
        tdm._hash_file(hashlib.sha256(), corpus)


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
@pytest.mark.parametrize("edited_while", ["the tokenizer is trained", "the tokens are written"])
def test_a_file_edited_while_the_cache_is_built_is_named_and_leaves_no_entry(tmp_path, corpus, monkeypatch,
                                                                            tokenizer, edited_while):
    # the cache key hashes the text first: an entry of the edited text under the first text's key would give
    # every later run on that text the tokens of the other, and no word of it
    edited = TEXT.replace("fox", "cat")  # the same size
    other = tmp_path / "other.txt"
    other.write_text(TEXT)
    build, encode = tdm.build_tokenizer, tdm.encode_pieces

    def train_on_edited(spec, texts, *args):
        corpus.write_text(edited)
        return build(spec, texts, *args)

    def write_edited(tok, texts):
        corpus.write_text(edited)
        return encode(tok, texts)
    if edited_while == "the tokenizer is trained":
        monkeypatch.setattr(tdm, "build_tokenizer", train_on_edited)
    else:
        monkeypatch.setattr(tdm, "encode_pieces", write_edited)
    dm = make(tmp_path, tmp_path / "*.txt", tokenizer=tokenizer, vocab_size=300)
    with pytest.raises(UsageError, match=r"^data.path: \S+corpus.txt changed while it was tokenized; run again "
                                         r"once it is written$"):
        dm.prepare_data()
    assert not list((tmp_path / "cache").glob("*"))  # nor a folder of its own left behind
    monkeypatch.undo()
    corpus.write_text(TEXT)
    dm.prepare_data()  # the text as it was hashed: tokenized, and the tokens are its own
    dm.setup()
    assert not dm.cache_hit and dm.tokenizer.decode(tokens_of(dm).tolist()) == TEXT + TEXT


def test_text_outside_a_tokenizer_files_vocabulary_is_counted_in_a_warning(tmp_path, corpus):
    import warnings

    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(["line", "the", "fox", "dog", ":"])}}
    hf = HF(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "words.json"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm = ready(tmp_path, corpus, tokenizer=str(tmp_path / "words.json"))
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert re.fullmatch(r"data.path: 240 of the corpus's 480 tokens \(50.00%\) are the unknown token of "
                        r"data.tokenizer .*words.json: it does not cover all of the text.*", str(caught[0].message))
    assert int((tokens_of(dm) == 0).sum()) == 240  # 40 lines of 12 words: the number and 5 others unknown
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tokenizer that covers the corpus: no warning
        ready(tmp_path / "covered", corpus, tokenizer="bpe", vocab_size=300)


def test_a_large_corpus_is_hashed_and_read_without_holding_it_whole(tmp_path):
    import hashlib
    import tracemalloc

    path = tmp_path / "big.txt"
    with open(path, "w") as f:
        for _ in range(24):
            f.write(("word " * 99 + "word\n") * 2_000)  # 24 x 1 MB
    tracemalloc.start()
    try:
        tdm._hash_file(hashlib.sha256(), path)
        hashed = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        chars = sum(len(piece) for piece in tdm.read_pieces(path))
        read = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert chars == path.stat().st_size == 24_000_000
    assert hashed < 4 << 20 and read < 8 << 20, (hashed, read)  # a few blocks, not the 24 MB


def test_bpe_from_the_config_vocab_size(tmp_path, corpus):
    dm = ready(tmp_path, corpus, tokenizer="bpe", vocab_size=280)
    assert dm.tokenizer.vocab_size == 280
    assert dm.tokenizer.decode(tokens_of(dm).tolist()) == TEXT
    # the saved tokenizer as the spec of another run
    again = ready(tmp_path, corpus, tokenizer=str(dm.cache_path / "tokenizer.json"))
    assert again.tokenizer.fingerprint() == dm.tokenizer.fingerprint()


@pytest.mark.parametrize("name, content, words", [
    ("missing.txt", None, "missing.txt does not exist"),
    ("empty", "folder", "the folder .*empty holds no files"),
    ("e.txt", b"", "e.txt is empty"),
    ("bom.txt", "\ufeff".encode(), "bom.txt is empty"),  # a byte order mark alone
    ("*.nothing", None, "matches no files"),
    ("bin.txt", b"ok\xff\xfe", "bin.txt is not UTF-8 text"),
])
def test_bad_paths_are_usage_errors(tmp_path, name, content, words):
    path = tmp_path / name
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError, match=f"^data.path: .*{words}") as e:
        make(tmp_path, path).prepare_data()
    assert "\n" not in str(e.value)


def test_a_corpus_shorter_than_one_window_says_what_to_lower(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 100)
    dm = make(tmp_path, path)  # validation gets 10 tokens < 17
    dm.prepare_data()
    words = r"100 tokens.*validation split \(10 tokens.*block_size\+1 = 17.*lower model.block_size"
    with pytest.raises(UsageError, match=words) as e:
        dm.setup()
    assert "\n" not in str(e.value)


def test_a_tokenizer_file_that_is_not_one(tmp_path, corpus):
    bad = tmp_path / "tok.json"
    bad.write_text('{"vocab": [1, 2]}')
    with pytest.raises(UsageError, match="is not a tokenizer file"):
        make(tmp_path, corpus, tokenizer=str(bad)).prepare_data()
    with pytest.raises(UsageError, match="data.tokenizer: got 'chr'"):
        make(tmp_path, corpus, tokenizer="chr").prepare_data()


def test_setup_before_prepare_data_is_an_error(tmp_path, corpus):
    with pytest.raises(RuntimeError, match="prepare_data"):
        make(tmp_path, corpus).setup()


def test_datasets_pickle_without_the_token_map(tmp_path, corpus):
    import pickle
    dm = ready(tmp_path, corpus)
    x0 = dm.train_set[0][0]
    clone = pickle.loads(pickle.dumps(dm.train_set))
    assert clone._tokens is None and clone._windows is None and torch.equal(clone[0][0], x0)
    assert os.path.samefile(clone.path, dm.cache_path / "tokens.bin")
