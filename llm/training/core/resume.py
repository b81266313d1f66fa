"""Resuming: which checkpoint a run starts from and whether its folder may be used, and what a config may change
on resume (how a run resumed reads its data exactly as before, the loaders and random streams, is loading.py's)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from llm.errors import UsageError, one_line
from llm.files import checkpoint_folder, run_files
from llm.training.core import distributed as D
from llm.training.core.checkpoint import (
    DROPPED,
    CheckpointError,
    CheckpointManager,
    check_checkpoint_dir,
    resolve_checkpoint,
    unwritable_reason,
)
from llm.training.core.callbacks import flatten, metrics_files
from llm.training.core.config import BUILTIN_TOKENIZERS, Config


# ---- where a run starts from -------------------------------------------------------------

class Start(NamedTuple):
    """Where a run starts: the checkpoint to resume from, and how the run folder may be used."""

    checkpoint: Path | None
    resuming: bool  # asked to resume (or restarted by torchrun): the run folder may hold this run already
    own_folder: bool  # the run folder holds this very run: restarted by torchrun, or the same branch again


def find_start(config: Config, run_dir: Path) -> Start:
    """The checkpoint to start from, if any.

    'auto': the newest valid one in checkpoint.dir. A run that continues in its
    own folder resumes that way too, once it has saved a checkpoint there: a
    worker that torchrun restarted, or the command that started a branch from a
    checkpoint, run again.
    """
    spec, directory = config.checkpoint.resume, Path(config.checkpoint.dir)
    resuming = bool(spec) or D.restarted()
    own_folder = _restarted_here(run_dir) or _branched_here(config, run_dir, spec)
    # a restart of a launch that wrote nothing yet (it failed in set-up) starts where the launch was told to
    if spec == "auto" or own_folder or (D.restarted() and not spec):
        own = CheckpointManager(directory).latest_valid() if directory.exists() else None
        if own is not None or spec in ("", "auto"):
            return Start(own, resuming, own_folder)
    try:
        return Start(resolve_checkpoint(spec) if spec else None, resuming, own_folder)
    except CheckpointError as e:  # named as a setting: the error then says where it was set, a file or a variable
        raise CheckpointError(f"checkpoint.resume: {e}") from None


def _restarted_here(run_dir: Path) -> bool:
    """Whether torchrun restarted this launch, which wrote the run folder before."""
    return D.restarted() and D.launch_id() is not None and D.launch_id() in D.launched_by(run_dir)


def _branched_here(config: Config, run_dir: Path, spec: str) -> bool:
    """Whether the run folder holds a run started from the checkpoint ``spec``: the same command again.

    For a checkpoint of the run's own folder (the run went back to it), only with the same course (see
    course_changes): with another (a lower learning rate, say), the command goes back to it once more.
    """
    if spec in ("", "auto"):
        return False
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        started_from = saved["checkpoint"]["resume"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, TypeError, KeyError):
        return False
    if not (isinstance(started_from, str) and started_from not in ("", "auto")
            and Path(started_from).resolve() == Path(spec).resolve()):
        return False
    if Path(spec).resolve().parent != Path(config.checkpoint.dir).resolve():
        return True  # a branch from another run's checkpoint, continued
    return not course_changes(config_changes(with_defaults(flatten(saved), config), _as_saved(config)))


def _as_saved(config: Config) -> dict[str, Any]:
    """``config`` flattened as a run's config.yaml holds it, to compare with one."""
    return flatten(yaml.safe_load(config.to_yaml()))


def check_run_dir(config: Config, run_dir: Path, start: Start) -> None:
    """A run must not write over another run's files; the run and checkpoint folders can be written."""
    existing = run_files(run_dir)
    if existing and not start.resuming:
        raise UsageError(
            f"{run_dir} already holds a run ({', '.join(sorted(existing)[:3])}): continue it with "
            f"--checkpoint-resume auto, or start a new one with --logging-log-dir DIR"
        )
    if existing and start.resuming and start.checkpoint is None:  # nothing saved here yet to continue
        _check_nothing_to_resume(config, run_dir)
    # a checkpoint of another run branches into a folder of its own, not into another run's files
    resume = start.checkpoint
    elsewhere = resume is not None and resume.resolve().parent != Path(config.checkpoint.dir).resolve()
    elsewhere = elsewhere and not start.own_folder
    if existing and elsewhere and resume.resolve().parent == (Path(config.checkpoint.dir) / DROPPED).resolve():
        raise UsageError(f"{resume} was set aside when this run went back to an earlier step: branch from it into "
                         f"a new --logging-log-dir DIR")
    if existing and elsewhere:
        raise UsageError(
            f"{run_dir} already holds a run and {resume} is not one of its checkpoints: continue the run "
            f"there with --checkpoint-resume auto, or branch from {resume} into a new --logging-log-dir DIR"
        )
    checkpoints = Path(config.checkpoint.dir)
    mine = elsewhere or start.own_folder or config.checkpoint.allow_config_change  # a branch, or said to be
    other = None if resume is None or mine else _run_of(resume, run_dir)
    if other is not None:
        # this run would go on writing its checkpoints among that run's, and its logs here
        raise UsageError(
            f"checkpoint.dir {checkpoints} holds the checkpoints of the run in {other}, not of {run_dir}: continue "
            f"that run with --logging-log-dir {other} --checkpoint-resume auto, branch from one of its checkpoints "
            f"into a new --logging-log-dir DIR, or, if {run_dir} is a copy of that run, pass "
            f"--checkpoint-allow-config-change true"
        )
    cache = [("data.cache_dir", Path(config.data.cache_dir).expanduser())] if config.data.cache_dir else []
    for name, folder in (("logging.log_dir", run_dir), ("checkpoint.dir", checkpoints), *cache):
        # another run's retention would delete this run's files with the checkpoint that holds them (its own
        # deletes only step_* folders), and a file of this run's in a checkpoint breaks its manifest
        holder = checkpoint_folder(folder, own=folder.resolve() == checkpoints.resolve())
        if holder is not None and holder != checkpoints.resolve():
            raise UsageError(f"{name} {folder} lies in the checkpoint folder {holder}, whose retention deletes "
                             f"what it holds: choose a folder outside it")
    problem = unwritable_reason(run_dir)  # creates nothing; a refused run removes the folder it made to hold it
    if problem:
        raise UsageError(f"cannot write to the run directory {run_dir}: {problem}; "
                         f"choose another with --logging-log-dir DIR")
    for path in metrics_files(run_dir) if existing else ():  # appended to: refused now, before config.yaml is
        if path.is_dir() or (path.exists() and not os.access(path, os.R_OK | os.W_OK)):
            what = "a folder" if path.is_dir() else "not a file this user can read and write"
            raise UsageError(f"cannot append to {path}: it is {what}; make it one, or start a new run with "
                             f"--logging-log-dir DIR")
    # now, not at the first save after hours of training; and never into another run's checkpoints
    check_checkpoint_dir(config.checkpoint.dir, fresh=not start.resuming or elsewhere)


def _check_nothing_to_resume(config: Config, run_dir: Path) -> None:
    """--checkpoint-resume auto found no checkpoint of the run in ``run_dir`` (killed before its first save,
    or saving elsewhere): starting afresh there is continuing it only if it is the same run, killed before it
    finished. Another run's folder, a finished run's whose checkpoints are gone, or one that holds a config file
    of the user's, is refused, not taken over (its config.yaml and summary.json rewritten, its records set
    aside)."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return  # no run's settings to compare with: killed before it wrote them
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as e:
        saved = e
    if not isinstance(saved, dict):  # not read as a run's settings: whose run it holds cannot be told
        why = one_line(saved) if isinstance(saved, BaseException) else "it is empty" if saved is None else \
            f"it holds a {type(saved).__name__}"
        raise UsageError(f"{run_dir} holds a run whose {path.name} cannot be read ({why}) and no checkpoint of it "
                         f"to continue: start this one in a new --logging-log-dir DIR")
    sections = [name for name, value in Config().to_dict().items() if isinstance(value, dict)]
    missing = [name for name in sections if not isinstance(saved.get(name), dict)]
    if missing or "task" not in saved:  # a run writes every section: this is a config file of the user's
        raise UsageError(f"{path} is no run's record of its settings (it lacks {', '.join(missing or ['task'])}: "
                         f"a config file of your own?) and {run_dir} holds no checkpoint to continue: the run would "
                         f"write its settings over it; keep your config files outside run folders, or start this "
                         f"run in a new --logging-log-dir DIR")
    saved, now = with_defaults(flatten(saved), config), _as_saved(config)
    given = saved.get("checkpoint.dir")  # kept as given: '' is the default, <log_dir>/checkpoints
    elsewhere = _from_where_started(given, saved.get("logging.log_dir"), run_dir) if isinstance(given, str) and given \
        else str(run_dir / "checkpoints")
    if Path(elsewhere).resolve() != Path(config.checkpoint.dir).resolve():
        if Path(elsewhere).is_dir() and CheckpointManager(Path(elsewhere)).latest_valid() is not None:
            raise UsageError(f"the run in {run_dir} saves its checkpoints in {elsewhere}: continue it with "
                             f"--checkpoint-dir {elsewhere}, or start this one in a new --logging-log-dir DIR")
    binding = [] if config.checkpoint.allow_config_change else binding_changes(config_changes(saved, now))
    started_from, starts_from = saved.get("checkpoint.init_from") or "", config.checkpoint.init_from
    if started_from != starts_from and not (started_from and starts_from and _same_place(started_from, starts_from)):
        binding.append("checkpoint.init_from")  # before its first save, the weights it started from are the run's
    binding.sort(key=lambda key: key != "task")  # another task says the most
    if binding:
        raise UsageError(f"{run_dir} holds a run with other settings ({', '.join(binding[:4])}) and no checkpoint "
                         f"of it to continue: start this one in a new --logging-log-dir DIR")
    if (run_dir / "summary.json").exists():  # not killed before its first save: its checkpoints were deleted
        raise UsageError(f"{run_dir} holds a finished run (summary.json) and no checkpoint of it in "
                         f"{config.checkpoint.dir} to continue: start this one in a new --logging-log-dir DIR")


def _from_where_started(path: str, log_dir: Any, run_dir: Path) -> str:
    """A relative ``path`` of a run's config.yaml, as it stands from here: from the folder that run was started
    in, which its ``log_dir``, relative too, and the run folder it names (``run_dir``) tell."""
    if Path(path).is_absolute() or not _tells_where_started(log_dir):
        return path  # as it stands from here, or no way to tell otherwise
    return os.path.relpath(_started_in(run_dir, Path(log_dir)) / path)  # as a flag given here would name it


def _tells_where_started(log_dir: Any) -> bool:
    """Whether a run's log_dir, with the folder it names, tells the folder the run was started in: a relative
    one without '..'."""
    return isinstance(log_dir, str) and not Path(log_dir).is_absolute() and ".." not in Path(log_dir).parts


RELATIVE_TO_START = ("data.path", "data.val_path", "data.tokenizer", "data.cache_dir")
"""The settings of a run that name files from the folder it was started in."""


def config_as_started(checkpoint: Path) -> tuple[Config, str]:
    """The config of the run that saved ``checkpoint`` (the config.yaml it holds), with the relative paths of
    its data (RELATIVE_TO_START) as they stand from here, from the folder that run was started in; UsageError
    in one line where there is none to read. Also what to add to an error about those paths where the folder
    cannot be told ('' where it can)."""
    try:
        saved = yaml.safe_load((checkpoint / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UsageError(f"{checkpoint / 'config.yaml'} cannot be read ({one_line(e)}), so the task and data "
                         f"its weights were trained on are unknown") from None
    if isinstance(saved, dict) and isinstance(saved.get("model"), dict) and "data" not in saved:
        raise UsageError(f"{checkpoint} holds a model's settings but no run's (a model llm.import_hf brought in): "
                         f"the data it was trained on is unknown; score it on a text with --data-path FILE")
    if not isinstance(saved, dict) or not isinstance(saved.get("checkpoint"), dict) or \
            not isinstance(saved.get("logging"), dict) or not isinstance(saved.get("data"), dict):
        raise UsageError(f"{checkpoint / 'config.yaml'} is no run's record of its settings")
    log_dir, given = saved["logging"].get("log_dir"), saved["checkpoint"].get("dir")
    run_dir = _where_it_was(Path(str(log_dir)), Path(given) if isinstance(given, str) and given else None, checkpoint)
    unplaced = []  # relative paths of a run whose log_dir does not tell the folder it was started in
    for key in RELATIVE_TO_START:
        name = key.split(".")[1]
        value = saved["data"].get(name)
        if isinstance(value, str) and value and not value.startswith("~") and \
                not (key == "data.tokenizer" and value in BUILTIN_TOKENIZERS):
            saved["data"][name] = _from_where_started(value, log_dir, run_dir)
            if not Path(value).is_absolute() and not _tells_where_started(log_dir):
                unplaced.append(key)
    hint = "" if not unplaced else (
        f"; the run's {', '.join(unplaced)} {'is' if len(unplaced) == 1 else 'are'} relative to the folder it was "
        f"started in, which its log_dir ({log_dir}) does not tell: run this from that folder")
    try:
        return Config.from_dict(saved, origin=str(checkpoint / "config.yaml")), hint
    except UsageError as e:
        raise UsageError(f"{e}{hint}") from None


def _started_in(found: Path, given: Path) -> Path:
    """The folder a run was started in, from a path it was given relative (without '..'), found at ``found``."""
    started_in = found.resolve()
    for _ in Path(os.path.normpath(given)).parts:
        started_in = started_in.parent
    return started_in


def _run_of(checkpoint: Path, run_dir: Path) -> Path | None:
    """The folder of another run that wrote ``checkpoint`` and still holds that run; None for a checkpoint inside
    ``run_dir`` (it is this folder's run's, however the folder was moved or copied)."""
    if checkpoint.resolve().is_relative_to(run_dir.resolve()):
        return None
    try:
        saved = Config.from_yaml(checkpoint / "config.yaml")  # its log_dir with {task} filled in
    except (UsageError, OSError):
        return None
    given = saved.given("checkpoint.dir")
    run = _where_it_was(Path(saved.logging.log_dir), Path(given) if given else None, checkpoint)
    if run.resolve() == run_dir.resolve() or not (run / "config.yaml").is_file():
        return None
    return run


def _where_it_was(log_dir: Path, checkpoint_dir: Path | None, checkpoint: Path) -> Path:
    """A run's ``log_dir`` as its checkpoint places it, whatever folder it was started from: a checkpoint folder
    filled in is ``<log_dir>/checkpoints``; a relative one given tells the folder the run was started from."""
    if checkpoint_dir is None:
        return checkpoint.parent.parent
    if log_dir.is_absolute() or checkpoint_dir.is_absolute() or ".." in checkpoint_dir.parts:
        return log_dir  # as it stands from here
    return _started_in(checkpoint.parent, checkpoint_dir) / log_dir


# ---- resuming with a changed config ------------------------------------------------------

BINDING_CONFIG = ("task", "model.", "data.", "training.batch_size", "training.grad_accum_steps", "training.seed",
                  "world_size", "optimizer.name", "custom.")
"""Settings a resumed run cannot change without training a different model, on different data, or with an
optimizer that cannot take the saved state (allowed, it starts afresh). What a task's own settings (custom.*)
change is the task's to know: taken as binding."""
HOW_TO_RESUME = ("checkpoint.resume", "checkpoint.allow_config_change", "checkpoint.init_from")
"""Settings that say how to resume, not what the run is: never a change."""
HARMLESS_CONFIG = ("data.num_workers", "data.cache_dir", "distributed.find_unused_parameters",
                   "training.max_minutes")
"""Settings that change neither the model, nor the data order, nor the schedule (num_workers from or to 0 does
change the stream a data set draws random numbers from in __getitem__: see change() and docs/checkpoints.md)."""


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The settings that differ between a checkpoint's flattened config and this run's (each with a
    ``world_size`` entry), but for those that say how to resume (HOW_TO_RESUME: what a checkpoint of the run
    has taken the place of, such as the weights it started from).
    Give ``saved`` with_defaults: a setting newer than the checkpoint counts as saved at its default."""
    return sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k) and k not in HOW_TO_RESUME
                  and not _same_file(k, saved, now) and not _same_in_effect(k, saved, now))


def with_defaults(saved: dict[str, Any], config: Config) -> dict[str, Any]:
    """A checkpoint's flattened settings, with those newer than it (this version's, the task's own) at their
    defaults: the run that saved it had those."""
    defaults = flatten({**Config().to_dict(), "custom": dataclasses.asdict(type(config.custom)())})
    return {**{k: v for k, v in defaults.items() if k not in saved}, **saved}


DATA_FILES = ("data.path", "data.val_path", "data.tokenizer")
"""Settings that name files: the same file named otherwise (./corpus.txt, its absolute path) is no change."""


def _same_file(key: str, saved: dict[str, Any], now: dict[str, Any]) -> bool:
    a, b = saved.get(key), now.get(key)
    if key not in DATA_FILES or not (isinstance(a, str) and isinstance(b, str) and a and b):
        return False
    return _same_place(a, b)


def _same_in_effect(key: str, saved: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether ``key`` is model.n_kv_head or model.head_size, given in one config as the number its 0 stands for in
    the other (n_head heads; n_embd / n_head wide): the same model."""
    def effective(flat: dict[str, Any]) -> Any:
        n_head, n_embd = flat.get("model.n_head"), flat.get("model.n_embd")
        if key == "model.n_kv_head":
            return flat.get(key) or n_head
        usual = n_embd // n_head if isinstance(n_embd, int) and isinstance(n_head, int) and n_head > 0 and \
            n_embd % n_head == 0 else None
        return flat.get(key) or usual

    return key in ("model.n_kv_head", "model.head_size") and effective(saved) is not None and \
        effective(saved) == effective(now)


def _same_place(a: str, b: str) -> bool:
    """Whether two paths name the same file or folder, ``~`` and links followed."""
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


@contextlib.contextmanager
def _artifacts_beside(task: Any, checkpoint: Path) -> Iterator[list[tuple[str, Path, Path]]]:
    """The files the task writes beside the weights (``save_artifacts``, into a temporary folder) that the
    checkpoint holds too: (name, this run's, the checkpoint's), by name."""
    with tempfile.TemporaryDirectory() as tmp:
        task.save_artifacts(Path(tmp))
        yield [(f.name, f, checkpoint / f.name) for f in sorted(Path(tmp).iterdir())
               if f.is_file() and (checkpoint / f.name).is_file()]


def changed_artifacts(task: Any, checkpoint: Path) -> list[str]:
    """The files the task writes beside the weights (``save_artifacts``: a tokenizer, the model's shape) that
    this run would write otherwise than the checkpoint holds them: a corpus or a tokenizer file edited since,
    which the config does not show. JSON files are compared as what they hold, not byte for byte, and a mapping
    on the keys the checkpoint's holds (an earlier version wrote fewer). A language model's corpus that is the
    same, tokenized or trained on otherwise, is named as such (TOKENIZED_OTHERWISE, RETRAINED_OTHERWISE)."""
    def content(path: Path) -> Any:
        data = path.read_bytes()
        if path.suffix == ".json":
            with contextlib.suppress(ValueError):
                return json.loads(data)
        return data

    changed, same_corpus = [], False
    with _artifacts_beside(task, checkpoint) as files:
        for name, mine, theirs in files:
            now, saved = content(mine), content(theirs)
            if name == "corpus.json":  # a language model's: the digest of its corpus, which both hold
                same_corpus = isinstance(now, dict) and isinstance(saved, dict) and \
                    "sha256" in saved and now.get("sha256") == saved["sha256"]
            if isinstance(now, dict) and isinstance(saved, dict):  # what an earlier version wrote holds fewer keys
                differ = {key for key in saved if now.get(key) != saved[key]}
                if differ:
                    changed.append(TOKENIZED_OTHERWISE if differ == {"tokens_sha256"} else name)
            elif now != saved:
                changed.append(name)
    if TOKENIZED_OTHERWISE in changed and len(changed) > 1:  # an edited tokenizer file moves the tokens itself
        changed.remove(TOKENIZED_OTHERWISE)
    data = getattr(getattr(task, "config", None), "data", None)
    if "tokenizer.json" in changed and getattr(data, "tokenizer", "") == "bpe" and same_corpus:
        changed[changed.index("tokenizer.json")] = RETRAINED_OTHERWISE  # nothing the user gave was edited
    return changed


FINE_TUNE_FREE = ("dropout", "block_size")
"""Settings in a model_config.json that a run started from another's weights may change, as the weights compute
the same with them (a shorter context of learned positions takes the first rows of the table, GPT.fit_weights; a
longer one is another shape, which loading the weights refuses)."""


def weights_changes(task: Any, checkpoint: Path) -> list[str]:
    """What of the files the task writes beside the weights differs from the checkpoint's such that its weights
    would compute otherwise here: ``tokenizer.json``, or the model's settings (``n_head (2 -> 4)``) but for
    FINE_TUNE_FREE. Not the corpus, which a run started from the weights is meant to change."""
    tokenizer, settings = False, []
    with _artifacts_beside(task, checkpoint) as files:
        for name, mine, theirs in files:
            if name not in ("tokenizer.json", "model_config.json"):
                continue
            now = json.loads(mine.read_text(encoding="utf-8"))
            try:
                saved = json.loads(theirs.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise UsageError(f"cannot read {theirs}: {one_line(e)}") from None
            if name == "tokenizer.json":
                tokenizer = now != saved
            elif not isinstance(saved, dict):
                raise UsageError(f"{theirs} holds a {type(saved).__name__}, not the model's settings")
            else:  # on the keys the checkpoint's holds, as changed_artifacts: an earlier version wrote fewer
                settings = [f"{key} ({saved[key]!r} -> {now.get(key)!r})" for key in sorted(saved)
                            if key not in FINE_TUNE_FREE and saved[key] != now.get(key)]
    return ["tokenizer.json"] if tokenizer else settings  # another tokenizer changes the vocabulary's size too


TOKENIZED_OTHERWISE = ("the corpus's tokens (the corpus is the same, but this version of llm or of tokenizers "
                       "tokenizes it otherwise than the one that started the run, which can finish it)")
"""What changed_artifacts names when a language model's corpus is unchanged but its tokens are not."""
RETRAINED_OTHERWISE = ("tokenizer.json (the corpus is the same, but the BPE tokenizer this version of llm or of "
                       "tokenizers trains on it comes out otherwise than the one that started the run, which can "
                       "finish it)")
"""What changed_artifacts names when a BPE tokenizer trained again on an unchanged corpus differs."""


COURSE_CONFIG = (*BINDING_CONFIG, "optimizer.", "training.grad_clip", "training.precision", "training.ema_decay")
"""Settings that send a run another way from the same checkpoint: the command that went back to a checkpoint of
the run's own folder, run again with another of them, goes back to it once more; with the same ones (more steps,
another device, other logging and saving), it continues where that continuation got to."""


def course_changes(changed: list[str]) -> list[str]:
    """The settings among ``changed`` that send a run another way from the same checkpoint (COURSE_CONFIG)."""
    return [k for k in changed if k.startswith(COURSE_CONFIG) and k not in HARMLESS_CONFIG]


def binding_changes(changed: list[str]) -> list[str]:
    """The settings among ``changed`` that bind a checkpoint to its model, data order or optimizer."""
    return [k for k in changed if k.startswith(BINDING_CONFIG) and k not in HARMLESS_CONFIG]


def change(key: str, saved: dict[str, Any], now: dict[str, Any]) -> str:
    """A changed setting as the resume's lines show it: ``optimizer.lr (0.02 -> 0.001)``; a setting newer than
    the checkpoint at its default, which the run that saved it had."""
    before = saved[key] if key in saved else flatten(Config().to_dict()).get(key)
    after = now.get(key)
    note = ""
    if key == "data.num_workers" and (before == 0) != (after == 0):  # with workers each batch has a seed of its own
        note = ("; what a data set draws at random in __getitem__ now comes from another stream, so the run goes "
                "on, but not bit for bit as it would have")
    if key in ("task", "data.module") and isinstance(before, str) and before.startswith("__main__:"):
        note = ("; a class of the script that trained, run as __main__, which no other process can name: if this "
                "is the same class, resume anyway as said below, and import it into that script from now on")
    return f"{key} ({before!r} -> {after!r}{note})"


_CORPUS = ("data.path", "data.val_path", "data.separator")
_TOKENIZER = (*_CORPUS, "data.tokenizer", "data.vocab_size")
EXPLAINED_BY = {"model_config.json": ("model.", "data.tokenizer", "data.vocab_size"), "corpus.json": _CORPUS,
                "tokenizer.json": _TOKENIZER, TOKENIZED_OTHERWISE: _TOKENIZER, RETRAINED_OTHERWISE: _TOKENIZER}
"""The settings whose change explains why a file the task writes beside the weights differs (by prefix)."""


def unexplained(files: list[str], changed: list[str]) -> list[str]:
    """The task's ``files`` (from changed_artifacts) that no setting among ``changed`` explains (EXPLAINED_BY):
    the model's shape by a model setting, a language model's corpus by its paths, its tokenizer by those and the
    tokenizer's settings; another data setting (data.val_fraction) explains neither. Another task, or its own
    settings, may write other files altogether: none is named then."""
    binding = binding_changes(changed)
    if any(key == "task" or key.startswith("custom.") for key in binding):
        return []
    return [name for name in files if not any(key.startswith(EXPLAINED_BY.get(name, ())) for key in binding)]


def check_changes(changed: list[str], allowed: bool, path: Path, files: list[str] = (),
                  saved: dict[str, Any] | None = None, now: dict[str, Any] | None = None) -> None:
    """Refuse changes that break the model, the data order or the optimizer's state, unless ``allowed``:
    settings (``changed``, shown with their ``saved`` and ``now`` values where given), and the task's files
    (``files``, from changed_artifacts)."""
    shown = [change(k, saved, now) if saved is not None and now is not None else k for k in binding_changes(changed)]
    binding = shown + [name if name in (TOKENIZED_OTHERWISE, RETRAINED_OTHERWISE) else f"{name} (as this run builds it)"
                       for name in files]
    if binding and not allowed:
        tokenizer = "tokenizer.json" in files or RETRAINED_OTHERWISE in files
        keep = (f" (its weights would then read other tokens: to keep the tokenizer they were trained with, copy "
                f"{path / 'tokenizer.json'} out of the run's folder and give it as --data-tokenizer too)"
                if tokenizer else "")
        raise UsageError(
            f"cannot resume {path}: {', '.join(binding)} changed, which changes the model, the data order or "
            f"the optimizer; pass --checkpoint-allow-config-change true to resume anyway{keep}"
        )


def batches_done_in_epoch(progress: dict[str, Any], saved_batch_size: int, batch_size: int, world_size: int,
                          stream: bool = False) -> int:
    """The resumed epoch's micro-batches already trained on, counted in this run's batches.

    The ranks take interleaved shares of one shuffled order, so the epoch's first
    batches x batch size x processes samples of it are done, whatever the number of
    processes. A resume with other processes or another batch size (allowed by
    checkpoint.allow_config_change) goes on from there; where that is not a whole
    number of this run's batches, the samples past the last whole one are seen again.
    Each rank's ``stream`` is its own: in another layout, where the ranks' streams
    stood means nothing, and the epoch starts again.
    """
    same_layout = (progress["world_size"], saved_batch_size) == (world_size, batch_size)
    if stream and not same_layout and progress["batch_in_epoch"]:
        warnings.warn(f"resuming a stream with {world_size} process(es) of batch {batch_size}, not "
                      f"{progress['world_size']} of {saved_batch_size}: epoch {progress['epoch']} starts again")
        return 0
    done = progress["batch_in_epoch"] * saved_batch_size * progress["world_size"]
    per_batch = batch_size * world_size
    if done % per_batch:
        warnings.warn(f"resuming mid-epoch with {world_size} process(es) of batch "
                      f"{batch_size}: {done % per_batch} samples of the epoch are seen again")
    return done // per_batch


def resume_plateau(optimizer: torch.optim.Optimizer, scheduler: ReduceLROnPlateau, saved: dict[str, Any] | None,
                   changed: list[str]) -> None:
    """Where a ReduceLROnPlateau stood: its best and counts, and the rates its last validation left the groups
    at, which cannot be replayed. Its settings (factor, patience, ...) are this run's scheduler's.

    The optimizer's saved groups may hold rates a later validation set, one that a
    run which never stopped would not have made (the last of a run): the rates are
    the scheduler's own record of them. A run resumed watching another metric, or
    the other way (checkpoint.monitor, checkpoint.mode), starts its plateau afresh,
    as its best metric does; one given another optimizer.lr starts at that rate.
    """
    if saved is None or {"checkpoint.monitor", "checkpoint.mode"} & set(changed):
        return
    for key in ("best", "num_bad_epochs", "cooldown_counter", "last_epoch"):
        if key in saved:
            setattr(scheduler, key, saved[key])
    rates = saved.get("_last_lr")
    if rates is not None and "optimizer.lr" not in changed:
        for group, lr in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = lr
        scheduler._last_lr = list(rates)


UNRECORDED = "?"
"""The kind of schedule of a checkpoint from before checkpoints recorded it."""


def schedule_kind(scheduler: Any) -> str | None:
    """What a checkpoint records of the scheduler whose state it holds: its class, by module and name."""
    return None if scheduler is None else f"{type(scheduler).__module__}.{type(scheduler).__qualname__}"


def same_kind_of_schedule(scheduler: Any, saved: dict[str, Any] | None, saved_kind: str | None) -> bool:
    """Whether ``saved``, a checkpoint's scheduler state, is one ``scheduler`` loads as its own: saved by the same
    class (``saved_kind``, from schedule_kind), or both None.

    A task whose build_scheduler changed between a save and a resume (the
    classification task's cosine of its own, before it took the built-in schedule)
    leaves a state of another class, which load_state_dict refuses in a KeyError, or
    takes as if it were its own where the names agree (LambdaLR's and
    MultiplicativeLR's). A checkpoint from before the class was recorded is judged
    by the public names its state holds: the private ones come and go with torch's
    versions.
    """
    if scheduler is None or saved is None:
        return scheduler is None and saved is None
    if saved_kind != UNRECORDED:
        return saved_kind == schedule_kind(scheduler)
    def public(state: dict[str, Any]) -> set[str]:
        return {key for key in state if not key.startswith("_")}
    return public(saved) == public(scheduler.state_dict())


def keep_optimizer_settings(optimizer: torch.optim.Optimizer, fresh_groups: list[dict[str, Any]],
                            scheduler: Any, step: int) -> None:
    """After a resume with a changed config: the optimizer's settings are this run's, and its rate is the
    new schedule's at the resumed step.

    ``optimizer.load_state_dict`` brings back the saved learning rate, weight decay
    and betas along with the moments, and the saved scheduler would keep the old
    schedule's length; a run resumed with new epochs, max_steps or rates means
    the new ones. So the groups get this run's settings back (``fresh_groups``:
    taken before the load), and this run's scheduler is stepped to the resumed
    step: step by step, so that a recursive schedule (CosineAnnealingLR's) gives
    the rates an uninterrupted run with the new settings would; a LambdaLR, whose
    rate depends on the step alone, jumps. (A ReduceLROnPlateau steps on
    validations, which cannot be replayed: see resume_plateau.)
    """
    # the same groups: optimizer.load_state_dict refuses a state with other groups
    for group, fresh in zip(optimizer.param_groups, fresh_groups, strict=True):
        group.update(fresh)
    if scheduler is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": on purpose
        if isinstance(scheduler, LambdaLR):
            scheduler.last_epoch = step - 1
            scheduler.step()
        else:
            for _ in range(step):
                scheduler.step()
    scheduler._step_count = step + 1  # as an uninterrupted run's counts its calls: the state saved next is the same
