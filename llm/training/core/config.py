"""Typed run configuration: nested dataclasses, their checks, YAML out.

Where the values come from is config_sources': precedence, lowest first, dataclass defaults < YAML (``--config
FILE``, each file over the ones before it) < environment (``LLM_<SECTION>_<FIELD>``) < command line
(``--<section>-<field>``).

Each field's help text is the one-line docstring written under it; ``--help``
and ``docs/config.md`` read it from there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from llm.errors import ConfigError, UsageError, closest
from llm.files import write_atomically
from llm.training.core.registry import DATA_MODULES, TASKS

ENV_PREFIX = "LLM_"
MAX_VOCAB_SIZE = 1 << 20
"""The largest data.vocab_size and model.vocab_size: four times the largest vocabularies in use."""
MAX_LAYERS = 1024
"""The largest model.n_layer: eight times the deepest models in use."""
BUILTIN_TOKENIZERS = ("byte", "char", "bpe")
"""Tokenizer names data.tokenizer takes besides a path."""
MAX_WORKERS = 256
"""The largest data.num_workers: each is a process of its own."""
MAX_TIMEOUT_S = 10**8
"""Longest distributed.timeout_s (about three years): torch counts the timeout in nanoseconds, which
overflow past about 9e9 s, and hangs or fails with a traceback on far less."""


@dataclass(slots=True)  # a field misspelled in code is an AttributeError, not ignored
class TrainingConfig:
    epochs: int = 10
    """Passes over the training data."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: no limit beyond epochs)."""
    max_minutes: float = 0.0
    """Stop at the first step this many minutes after training began in this process (0: no limit), validated and saved, to go on with --checkpoint-resume auto (a job's time limit); the command line then exits 75, or 0 under torchrun, which restarts workers that exit otherwise."""
    batch_size: int = 32
    """Samples per rank in one micro-batch."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated into one optimizer step."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights with this decay per optimizer step (0.999: about the last 1000 steps); validation and the weights the tools take from a checkpoint are the average's (0: none)."""
    seed: int = 0
    """Seed for model init, data order and every random number generator."""
    eval_every_steps: int = 0
    """Validate every N optimizer steps (0: only at the end of each epoch)."""
    eval_batches: int = 0
    """Validation batches per evaluation on each rank (0: the whole validation set)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision; fp16 adds a gradient scaler (training records log loss_scale and overflow_steps)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: auto picks cuda when available."""
    tf32: bool = False
    """On CUDA, run float32 matmuls in TensorFloat-32 (10-bit mantissa, several times faster); no effect on the CPU."""
    deterministic: bool = False
    """Deterministic algorithms only (torch.use_deterministic_algorithms), so that a rerun on a GPU is bit for bit; slower, and an op with none stops the run naming it."""
    compile: bool = False
    """torch.compile the model (block by block when it has .blocks) and the loss; compile time is reported apart."""
    compile_mode: Literal["default", "max-autotune"] = "default"
    """With compile: max-autotune times several kernels for each matmul and keeps the fastest (on a GPU, faster steps for a longer compile; CUDA graphs stay off)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them."""
    nan_policy: Literal["stop", "skip"] = "stop"
    """On a non-finite loss or gradient norm: stop the run, or skip the step (fp16 overflows: the scaler skips)."""
    patience: int = 5
    """Stop early after this many validations without improvement of checkpoint.monitor."""
    early_stopping: bool = True
    """Stop early as training.patience says (false: train the epochs and steps asked for, whatever the validations)."""


@dataclass(slots=True)
class OptimizerConfig:
    name: Literal["adamw", "adam", "sgd", "muon"] = "adamw"
    """Optimizer; muon: Muon on the hidden matrices, AdamW on embeddings, head and vectors."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.01
    """Weight decay, on matrices only: decoupled from the gradient for adamw and muon, added to it (L2) for adam and sgd."""
    beta1: float = 0.9
    """First moment decay (adam, adamw) or momentum (sgd)."""
    beta2: float = 0.999
    """Second moment decay (adam, adamw)."""
    warmup_steps: int = 0
    """Linear warmup over this many optimizer steps, the first at lr/(warmup_steps+1)."""
    scheduler: Literal["constant", "cosine", "linear", "wsd"] = "cosine"
    """Learning-rate decay after warmup, reaching min_lr as the last step ends; wsd (warmup, stable, decay): lr until the last decay_fraction of the steps, then down to min_lr as decay_shape says, so that a run given more steps while still at lr trains on as if it had always been given them."""
    decay_fraction: float = 0.2
    """wsd: the share of the steps after warmup over which the rate falls to min_lr."""
    decay_shape: Literal["linear", "1-sqrt"] = "linear"
    """wsd: how the rate falls over that share: linear, or 1-sqrt (min_lr + (lr - min_lr)(1 - sqrt(p)) at progress p of the decay), which falls faster at first and slower near the end."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""


@dataclass(slots=True)
class ModelConfig:
    n_layer: int = 4
    """Transformer blocks (lm) or hidden layers (regression, classification; 0: a linear model)."""
    n_head: int = 4
    """Attention heads per block (lm)."""
    n_kv_head: int = 0
    """Key-value heads per block (lm): fewer than n_head share each among n_head/n_kv_head query heads (grouped-query attention, a smaller KV cache); 0: as many as n_head."""
    n_embd: int = 128
    """Embedding width (lm) or hidden units (regression, classification)."""
    head_size: int = 0
    """Width of each attention head (lm; 0: n_embd / n_head). Another width makes the queries n_head x head_size wide, as some Qwen3 and Mistral models have them."""
    block_size: int = 128
    """Context length in tokens (lm)."""
    dropout: float = 0.0
    """Dropout probability."""
    bias: bool = False
    """Bias terms in linear and norm layers (lm)."""
    qkv_bias: bool = False
    """Bias terms in the query, key and value projections, whatever model.bias says (lm; Qwen2 has them alone)."""
    qk_norm: bool = False
    """Normalise each attention head's query and key (model.norm, over the head's width) before the rotary positions (lm; as Qwen3 does), which keeps the attention logits from growing as training goes on."""
    pos_emb: Literal["rope", "learned"] = "rope"
    """Position encoding (lm): rotary or learned absolute."""
    rope_base: float = 10000.0
    """Base of the rotary positions' wavelengths (lm; Llama 3 takes 500000 for its long context)."""
    rope_scaling: float = 0.0
    """Stretch the rotary positions' long wavelengths by this factor, as Llama 3.1 (8) and 3.2 (32) do past the 8192 positions they were first trained on (lm; 0: none)."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalisation layer (lm)."""
    norm_eps: float = 1e-5
    """Epsilon the normalisation layers add to the variance (lm)."""
    mlp: Literal["swiglu", "gelu", "gelu_tanh"] = "swiglu"
    """Feed-forward block (lm): SwiGLU, or an MLP with the erf GELU or GPT-2's tanh approximation of it."""
    mlp_hidden: int = 0
    """Hidden units of the feed-forward block (lm); 0: 8/3 n_embd rounded up to a multiple of 64 for swiglu (the parameters of a 4x MLP), 4 n_embd for gelu."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head (lm)."""
    vocab_size: int = 0
    """Rows of the token embedding and output head (lm): 0 = the tokenizer's; more pads them (50257 -> 50304 runs faster)."""


@dataclass(slots=True)
class DataConfig:
    module: str = ""
    """Data module: a built-in name or package.module:Class (default: the task's own)."""
    path: str = ""
    """Training data: a file, a folder or a glob (text data modules)."""
    val_path: str = ""
    """Validation data (text data modules): a file, a folder or a glob, scored in place of the last data.val_fraction of data.path; its files are left out of the training data, and the tokenizer is trained without them."""
    num_samples: int = 2048
    """Samples in a synthetic data set."""
    input_dim: int = 16
    """Features per sample in a synthetic data set."""
    num_classes: int = 4
    """Classes in the synthetic classification data set."""
    noise: float = 0.1
    """Noise of a synthetic data set: the std of the targets' noise (regression), what widens each class's cluster (classification)."""
    val_fraction: float = 0.1
    """Share of the data held out for validation (the last part of a text corpus)."""
    separator: str = ""
    """Text put between the files of a corpus (a folder or a glob), such as <|endoftext|>, so that the model sees where one document ends; a bpe tokenizer trained here takes it as one token of its own (default: nothing between them)."""
    tokenizer: str = "char"
    """Tokenizer: byte, char, bpe, or the path of a tokenizer.json."""
    vocab_size: int = 512
    """Vocabulary size when training a bpe tokenizer (at most 2**20)."""
    cache_dir: str = ""
    """Where tokenized corpora are cached (default: ~/.cache/llm)."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""


@dataclass(slots=True)
class CheckpointConfig:
    dir: str = ""
    """Checkpoint directory (default: <log_dir>/checkpoints)."""
    every_n_steps: int = 0
    """Save every N optimizer steps (0: not by steps)."""
    every_n_minutes: float = 30.0
    """Also save at the first step this many minutes after the last save (0: not by the clock), so that a run killed without warning (out of memory, a lost node) loses at most about that much."""
    async_save: bool = False
    """Write each checkpoint on a background thread while training goes on: a save stops the loop only to copy the state into host memory (rank 0 the whole of it, or under FSDP each rank its shards: that much must be free), and the next save, the run's end or a stop waits for it to finish; a save that fails in the background fails the run there."""
    keep_last: int = 3
    """Newest checkpoints kept, besides the best (keep_best)."""
    keep_best: int = 1
    """Also keep this many checkpoints with the best checkpoint.monitor; checkpoints/best names the best (0: none kept for their score)."""
    resume: str = ""
    """Resume: '' (start fresh), 'auto' (newest valid checkpoint in dir, if any) or a path."""
    init_from: str = ""
    """Start from the weights of this checkpoint (or the newest in a run's folder), to fine-tune: optimizer, schedule, step and data order start afresh; a resume of this run takes its own checkpoints."""
    monitor: str = "val_loss"
    """Metric that picks the best checkpoint."""
    mode: Literal["min", "max"] = "min"
    """Whether a lower or a higher monitored value is better."""
    allow_config_change: bool = False
    """Resume even when the model, data, batch size, seed or world size differ from the checkpoint's."""


LOGGER_NAMES = ("tensorboard", "mlflow", "wandb")


@dataclass(slots=True)
class LoggingConfig:
    log_dir: str = "runs/{task}"
    """Run directory for config, metrics, TensorBoard events and summary ({task} is filled in)."""
    log_every_steps: int = 50
    """Log training metrics every N optimizer steps."""
    progress_bar: bool = True
    """Show a progress bar on rank 0 when stderr is a terminal."""
    loggers: str = "tensorboard"
    """Comma-separated trackers: tensorboard, mlflow, wandb (the command line writes metrics.jsonl whatever this says)."""
    callbacks: str = ""
    """Comma-separated callbacks of your own to add, each package.module:Class, built with no arguments."""
    profile_steps: int = 0
    """Record this many steps with torch.profiler (0: none): a trace and a table per rank in <log_dir>/profile/."""
    profile_from_step: int = 10
    """The first step logging.profile_steps records (counted from 1; the first steps hold compilation)."""

    def callback_names(self) -> list[str]:
        """The callbacks named, each once."""
        return list(dict.fromkeys(name.strip() for name in self.callbacks.split(",") if name.strip()))

    def logger_names(self) -> list[str]:
        """The trackers named, each once (tensorboard,tensorboard would log every scalar twice)."""
        return list(dict.fromkeys(name.strip() for name in self.loggers.split(",") if name.strip()))


@dataclass(slots=True)
class DistributedConfig:
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend: auto picks nccl with CUDA, gloo otherwise."""
    strategy: Literal["ddp", "fsdp", "hsdp"] = "ddp"
    """Data parallel (DDP), fully sharded across all processes (FSDP2, per block), or hsdp: sharded across the processes of each node and replicated across nodes (gradients all-reduced between nodes: FSDP's memory, DDP's traffic between nodes)."""
    timeout_s: int = 600
    """Seconds a collective may wait for another rank before the run fails (ranks preparing the data are waited for as long as they are alive)."""
    find_unused_parameters: bool = False
    """DDP: find each step the parameters the loss does not depend on (a branch some steps skip), at the cost of a pass over the autograd graph; without it, such a model stops in one line naming them."""


@dataclass(slots=True)
class NoSettings:
    """The ``custom`` section of a task that declares no settings of its own."""


@dataclass
class Config:
    task: str = "regression"
    """Task: a built-in name (regression, classification, lm) or package.module:Class."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    custom: Any = field(default_factory=NoSettings)
    """The task's own settings: an instance of its ``Settings`` dataclass (see settings_of), flags --custom-<field>."""

    def __eq__(self, other: object) -> bool:
        """The same settings as given: a path that validate() filled in counts as what it was filled in from,
        so that a Config built in code equals itself saved and loaded back (which fills its paths in)."""
        return self.to_dict() == other.to_dict() if isinstance(other, Config) else NotImplemented

    # ---- loading and saving -------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "config") -> Config:
        """A validated Config from a nested mapping of overrides."""
        config = cls()
        config._apply(data, origin)
        config.custom = fitted_settings(config, task_settings(config.task, needed=False), config.task)
        return config.validate()

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Config:
        """Load and validate a YAML file of overrides (missing keys keep their defaults)."""
        return cls.from_args_and_env([f"--config={os.fspath(path)}"], environ={})

    def save_to_yaml(self, path: str | os.PathLike) -> None:
        """Write the whole config as YAML (atomically: no half-written file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, self.to_yaml())

    def to_dict(self) -> dict[str, Any]:
        """The config as a nested mapping for from_dict: a path that validate() filled in is what it was filled
        in from (``runs/{task}``, an empty checkpoint.dir), so that a copy given another task or log_dir puts
        the run, and its checkpoints, where those say. ``dataclasses.asdict`` gives the paths as filled in."""
        data = dataclasses.asdict(self)
        for key in getattr(self, "_filled", {}):
            section, name = key.split(".")
            data[section][name] = self.given(key)
        if not data["custom"]:  # a task without settings of its own: its config.yaml as before there were any
            del data["custom"]
        return data

    def given(self, key: str) -> Any:
        """``section.field`` as given: a path that validate() filled in is what it was filled in from."""
        section, name = key.split(".")
        value = getattr(getattr(self, section), name)
        source, filled = getattr(self, "_filled", {}).get(key, (value, value))
        return source if value == filled else value

    def set_by(self, key: str) -> str:
        """Where ``section.field`` got its value, when that was not a flag, for an error about it to name:
        " (in FILE)", " (set by the environment variable LLM_...)"; "" for a flag, a default or code."""
        return getattr(self, "_set_by", {}).get(key, "")

    def to_yaml(self) -> str:
        """The config as a YAML file to pass back with ``--config``; its paths as to_dict() gives them."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_args_and_env(
        cls, argv: list[str] | None = None, environ: dict[str, str] | None = None
    ) -> Config:
        """Defaults < ``--config`` YAML < ``LLM_*`` environment < flags (see config_sources)."""
        from llm.training.core.config_sources import config_from  # it reads this module's classes

        return config_from(cls, sys.argv[1:] if argv is None else argv, os.environ if environ is None else environ)

    def _apply(self, data: Any, origin: str, task: str | None = None) -> None:
        """Set the fields ``data`` gives; its custom section holds the settings of ``task``, else of the task
        ``data`` names."""
        if not isinstance(data, dict):
            raise UsageError(f"{origin}: the top level must be a mapping of sections, got {type(data).__name__}")
        sections = {f.name for f in dataclasses.fields(self)}
        for key, value in sorted(data.items(), key=lambda item: item[0] != "task"):  # custom's fields are the task's
            if key not in sections:
                raise ConfigError(str(key), value, f"a known section{_placed(str(key), sections)}")
            target = getattr(self, key)
            if key != "custom" and not dataclasses.is_dataclass(target):
                setattr(self, key, _convert(key, value, _hints(type(self))[key]))
                continue
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(key, value, "a mapping of fields")
            if key == "custom":
                target = self._settings_for(value, task or self.task)
            names = {f.name for f in dataclasses.fields(target)}
            hints = _hints(type(target))
            for name, raw in value.items():
                if name not in names:
                    raise ConfigError(f"{key}.{name}", raw, f"a field of {key}{closest(str(name), names) or f': one of {sorted(names)}'}")
                _assign(target, name, _convert(f"{key}.{name}", raw, hints[name]))

    def _settings_for(self, given: dict[str, Any], task: str) -> Any:
        """``self.custom`` as an instance of the settings of ``task``, to set ``given`` fields of."""
        settings = task_settings(task)
        if given and settings is NoSettings:
            raise ConfigError("custom", given, f"no custom section: task {task!r} declares no settings of its "
                              f"own (a Settings dataclass)")
        if type(self.custom) is NoSettings:
            self.custom = settings()
        elif type(self.custom) is not settings:  # a section of another task's given before: not dropped unsaid
            raise ConfigError("custom", given, f"the settings of task {task!r}; the config holds "
                              f"{type(self.custom).__qualname__} already")
        return self.custom

    # ---- validation -----------------------------------------------------------

    def validate(self) -> Config:
        """Check every value; fill in derived paths. Raises ConfigError."""
        for section, cls in sections().items():  # a section replaced in code by a dict of its fields
            if not isinstance(getattr(self, section), cls):
                raise ConfigError(section, getattr(self, section), f"a {cls.__name__}: set its fields one by one, or "
                                                                   f"build the config with Config.from_dict")
        if not (dataclasses.is_dataclass(self.custom) and not isinstance(self.custom, type)):
            raise ConfigError("custom", self.custom, "an instance of the task's Settings dataclass")
        _setting_types(type(self.custom), "custom")
        for name, value, tp in self._fields():  # what YAML, variables and flags went through, for values set in code
            plain = _plain(value, tp)
            if plain is not value:  # a Path or a NumPy number set in code: the same value, as YAML can write it
                section, _, field_name = name.rpartition(".")
                _assign(getattr(self, section) if section else self, field_name, plain)
            elif not _is_a(value, tp):
                choices = map(str, get_args(tp)) if get_origin(tp) is Literal else []
                raise ConfigError(name, value, describe(tp) + closest(str(value), choices))
            elif isinstance(value, str) and "\0" in value:  # no path or name holds one
                raise ConfigError(name, value, "text without a NUL character")
            elif isinstance(value, str) and not value.isascii() and _undecoded(value):
                # bytes of a command line or variable that are not UTF-8: no TensorBoard, YAML or JSON file takes them
                raise ConfigError(name, value, "UTF-8 text (rename what holds other bytes)")
            elif isinstance(value, int) and not -2**63 <= value < 2**63:  # what torch and itertools can count to
                # (the bound passed only: a field's own bound, such as seed >= 0, is checked below)
                raise ConfigError(name, value, "an integer below 2**63" if value > 0 else "an integer >= -2**63")
        t, o, m, d, c, lg = self.training, self.optimizer, self.model, self.data, self.checkpoint, self.logging
        _at_least("training.epochs", t.epochs, 1)
        _at_least("training.max_steps", t.max_steps, 0)
        _at_least("training.batch_size", t.batch_size, 1)
        _at_least("training.grad_accum_steps", t.grad_accum_steps, 1)
        _at_least("training.grad_clip", t.grad_clip, 0.0)
        _at_least("training.max_minutes", t.max_minutes, 0.0)
        _fraction("training.ema_decay", t.ema_decay)
        _at_least("training.seed", t.seed, 0)
        _at_least("training.eval_every_steps", t.eval_every_steps, 0)
        _at_least("training.eval_batches", t.eval_batches, 0)
        _at_least("training.patience", t.patience, 0)
        if t.compile_mode != "default" and not t.compile:
            raise ConfigError("training.compile_mode", t.compile_mode, "'default' unless training.compile is true "
                              "(set --training-compile true as well)")
        if t.compile_mode == "max-autotune" and t.deterministic:  # it keeps whichever kernel timed fastest
            raise ConfigError("training.compile_mode", t.compile_mode, "'default' with training.deterministic: "
                              "autotuning picks each matmul's kernel by timing, which can pick another in a rerun")
        _positive("optimizer.lr", o.lr)
        _at_least("optimizer.weight_decay", o.weight_decay, 0.0)
        _fraction("optimizer.beta1", o.beta1)
        _fraction("optimizer.beta2", o.beta2)
        _at_least("optimizer.warmup_steps", o.warmup_steps, 0)
        _at_least("optimizer.min_lr", o.min_lr, 0.0)
        if not 0.0 < o.decay_fraction <= 1.0:
            raise ConfigError("optimizer.decay_fraction", o.decay_fraction, "a number in (0, 1]")
        if o.min_lr > o.lr:
            raise ConfigError("optimizer.min_lr", o.min_lr, f"a value <= optimizer.lr ({o.lr})")
        lm = self.task == "lm"
        for name in ("n_head", "n_embd", "block_size"):
            _at_least(f"model.{name}", getattr(m, name), 1)
        _at_least("model.n_layer", m.n_layer, 1 if lm else 0)  # an MLP without a hidden layer: a linear model
        if m.n_layer > MAX_LAYERS:  # building that many blocks takes hours before memory runs out
            raise ConfigError("model.n_layer", m.n_layer, f"at most {MAX_LAYERS}")
        _at_least("model.vocab_size", m.vocab_size, 0)
        if m.vocab_size > MAX_VOCAB_SIZE:  # an embedding of that many rows is built before the first step
            raise ConfigError("model.vocab_size", m.vocab_size, f"at most {MAX_VOCAB_SIZE:,}")
        _fraction("model.dropout", m.dropout)
        _at_least("model.n_kv_head", m.n_kv_head, 0)
        _at_least("model.mlp_hidden", m.mlp_hidden, 0)
        _at_least("model.head_size", m.head_size, 0)
        _positive("model.rope_base", m.rope_base)
        _positive("model.norm_eps", m.norm_eps)
        if m.rope_scaling and not m.rope_scaling >= 1:
            raise ConfigError("model.rope_scaling", m.rope_scaling, "0 (none) or a factor >= 1")
        if lm and m.n_embd % m.n_head and not m.head_size:  # a custom task's GPT says so when built
            raise ConfigError("model.n_embd", m.n_embd, f"a multiple of model.n_head ({m.n_head}), or a model.head_size")
        if lm and m.head_size % 2 and m.pos_emb == "rope":
            raise ConfigError("model.head_size", m.head_size, "an even number, for model.pos_emb rope")
        if lm and not m.head_size and m.n_embd // m.n_head % 2 and m.pos_emb == "rope":
            raise ConfigError("model.n_embd", m.n_embd, f"a multiple of 2 x model.n_head ({m.n_head}) for model.pos_emb "
                                                        f"rope, whose rotary positions need an even head size (here "
                                                        f"{m.n_embd // m.n_head}); or give a model.head_size, or use "
                                                        f"--model-pos-emb learned")
        if lm and m.n_kv_head and m.n_head % m.n_kv_head:
            raise ConfigError("model.n_kv_head", m.n_kv_head, f"a divisor of model.n_head ({m.n_head}), or 0")
        for name in ("num_samples", "input_dim", "vocab_size"):
            _at_least(f"data.{name}", getattr(d, name), 1)
        if d.vocab_size > MAX_VOCAB_SIZE:  # training a bpe tokenizer allocates for every entry up front
            raise ConfigError("data.vocab_size", d.vocab_size, f"at most {MAX_VOCAB_SIZE:,}")
        _at_least("data.num_classes", d.num_classes, 2)
        _at_least("data.noise", d.noise, 0.0)
        _at_least("data.num_workers", d.num_workers, 0)
        if d.num_workers > MAX_WORKERS:  # each is a process
            raise ConfigError("data.num_workers", d.num_workers, f"at most {MAX_WORKERS}")
        if not 0.0 < d.val_fraction < 1.0:
            raise ConfigError("data.val_fraction", d.val_fraction, "a number between 0 and 1 (exclusive)")
        _at_least("checkpoint.every_n_steps", c.every_n_steps, 0)
        _at_least("checkpoint.every_n_minutes", c.every_n_minutes, 0.0)
        _at_least("checkpoint.keep_last", c.keep_last, 1)
        _at_least("checkpoint.keep_best", c.keep_best, 0)
        if c.init_from and c.resume not in ("", "auto"):
            raise ConfigError("checkpoint.init_from", c.init_from, f"no checkpoint.resume path beside it (both start a "
                              f"run from a checkpoint; checkpoint.resume is {c.resume!r}): give one of them")
        _at_least("logging.log_every_steps", lg.log_every_steps, 1)
        for name in lg.callback_names():
            _component("logging.callbacks", name, {})
        _at_least("logging.profile_steps", lg.profile_steps, 0)
        _at_least("logging.profile_from_step", lg.profile_from_step, 1)
        for name in lg.logger_names():
            if name not in LOGGER_NAMES:
                raise ConfigError("logging.loggers", lg.loggers, f"names from {', '.join(LOGGER_NAMES)}{closest(name, LOGGER_NAMES)}")
        _at_least("distributed.timeout_s", self.distributed.timeout_s, 1)
        if self.distributed.timeout_s > MAX_TIMEOUT_S:
            raise ConfigError("distributed.timeout_s", self.distributed.timeout_s, f"at most {MAX_TIMEOUT_S}")
        _component("task", self.task, TASKS)
        if d.module:
            _component("data.module", d.module, DATA_MODULES)
        # filled-in paths follow what they were filled in from: validated again after a change of task or
        # log_dir (a sweep in code, train.py moving a run to the next free folder), a path still as filled in
        # is filled in anew
        filled, self._filled = getattr(self, "_filled", {}), {}
        if lg.log_dir == filled.get("logging.log_dir", (None, None))[1]:
            lg.log_dir = filled["logging.log_dir"][0]
        if c.dir == filled.get("checkpoint.dir", (None, None))[1]:
            c.dir = ""
        lg.log_dir, c.dir = os.path.expanduser(lg.log_dir), os.path.expanduser(c.dir)  # bash keeps ~ after "="
        if "{task}" in lg.log_dir:
            resolved = self.fill_in(lg.log_dir)
            self._filled["logging.log_dir"], lg.log_dir = (lg.log_dir, resolved), resolved
        if Path(lg.log_dir).name in ("", ".."):  # '', '.', '/', 'runs/..': no name to give a run of its own
            raise ConfigError("logging.log_dir", lg.log_dir, "a path ending in a folder name, such as runs/lm")
        if not c.dir:
            c.dir = str(Path(lg.log_dir) / "checkpoints")
            self._filled["checkpoint.dir"] = ("", c.dir)
        return self

    def fill_in(self, path: str) -> str:
        """``path`` with ``{task}`` replaced by the task's name, as in logging.log_dir (runs/{task} -> runs/lm;
        package.module:Outer.MyTask -> runs/mytask)."""
        return path.replace("{task}", self.task.rpartition(":")[2].rpartition(".")[2].lower())

    def _fields(self) -> Iterator[tuple[str, Any, Any]]:
        """(section.field, value, type) of every field."""
        yield "task", self.task, _hints(Config)["task"]
        for section, cls in {**sections(), "custom": type(self.custom)}.items():
            values, hints = getattr(self, section), _hints(cls)
            for f in dataclasses.fields(cls):
                yield f"{section}.{f.name}", getattr(values, f.name), hints[f.name]


# ---- a task's own settings --------------------------------------------------------


SETTING_TYPES = (int, float, bool, str)
"""The types a task's own setting may have (or a Literal of strings): what a flag, a variable and YAML can give."""


def settings_of(task: type) -> type:
    """The dataclass of a task's own settings, its ``Settings`` attribute; NoSettings for a task without."""
    settings = getattr(task, "Settings", None)
    if settings is None:
        return NoSettings
    owner = f"{task.__qualname__}.Settings"
    if not (isinstance(settings, type) and dataclasses.is_dataclass(settings)):
        raise UsageError(f"{owner}: expected a dataclass of the task's settings, got {settings!r}")
    _setting_types(settings, owner)
    return settings


def _setting_types(settings: type, owner: str) -> None:
    """Refuse a settings dataclass whose fields no flag could set: of other types, or without defaults."""
    try:
        hints = _hints(settings)
    except Exception as e:  # noqa: BLE001 - an annotation naming what its module does not define
        raise UsageError(f"{owner}: its annotations cannot be read ({type(e).__name__}: {e})") from None
    for f in dataclasses.fields(settings):
        tp = hints[f.name]
        if not (tp in SETTING_TYPES or get_origin(tp) is Literal and all(isinstance(a, str) for a in get_args(tp))):
            raise UsageError(f"{owner}.{f.name}: a setting is an int, float, bool, str or a Literal of strings, "
                             f"not {getattr(tp, '__name__', tp)}")
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UsageError(f"{owner}.{f.name}: give it a default (a run that does not set it takes that)")


def task_settings(task: Any, needed: bool = True) -> type:
    """settings_of the task a config names; a built-in task has none, and is not imported to say so. A task that
    cannot be imported (yet: a class of the script at hand, named by its module) counts as having none unless
    its settings are ``needed`` (given values): the engine, which holds the task, fills them in."""
    module, _, cls = task.partition(":") if isinstance(task, str) else ("", "", "")
    if not (module and cls) or module.startswith("."):  # a built-in, or no name of a class: validate() says so
        return NoSettings
    from llm.training.core.registry import resolve_task

    try:
        resolved = resolve_task(task)
    except UsageError:
        if needed:
            raise
        return NoSettings
    return settings_of(resolved)  # a Settings no flag could set is refused, with --help too


def fitted_settings(config: Config, settings: type, task: str) -> Any:
    """What ``config.custom`` should be for ``task``, whose Settings dataclass is ``settings``: it, or the
    settings at their defaults where it holds none; another task's are refused."""
    held = type(config.custom)
    if held is settings:
        return config.custom
    names = [f.name for f in dataclasses.fields(settings)]
    if {held.__module__, settings.__module__} & {"__main__", "__mp_main__"} and held.__qualname__ == settings.__qualname__ \
            and [f.name for f in dataclasses.fields(held)] == names:
        # the same class twice: a script's own (__main__'s) and the module the config names by the same file
        return settings(**{name: getattr(config.custom, name) for name in names})
    if held is not NoSettings:
        wanted = f"takes {settings.__qualname__}" if settings is not NoSettings else "declares no settings of its own"
        raise UsageError(f"custom: the config holds {held.__qualname__}, the settings of another task, and task "
                         f"{task!r} {wanted}")
    return settings()


def sections() -> dict[str, type]:
    """Section name -> its dataclass, in declaration order."""
    hints = _hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def describe(tp: Any) -> str:
    """How a type reads in help text and error messages."""
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


# ---- conversion and checks --------------------------------------------------------

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _assign(target: Any, name: str, value: Any) -> None:
    """``setattr``, also on a task's settings declared frozen (immutable once the config is built)."""
    if getattr(getattr(target, "__dataclass_params__", None), "frozen", False):
        object.__setattr__(target, name, value)
    else:
        setattr(target, name, value)


def _plain(value: Any, tp: Any) -> Any:
    """A value set in code as the built-in type its field takes: a Path as text, a NumPy number as a number
    (``np.logspace`` gives np.float64), a choice in capitals in lower case; ``value`` itself otherwise."""
    if tp is str and isinstance(value, os.PathLike):
        return os.fspath(value)
    if get_origin(tp) is Literal and isinstance(value, str) and value not in get_args(tp):
        return value.lower() if value.lower() in get_args(tp) else value  # AdamW, FP32: the choice meant
    if tp in (int, float) and type(value) not in (int, float, bool) and isinstance(value, numbers.Real):
        if tp is float or isinstance(value, numbers.Integral):
            return tp(value)
    return value


def _convert(name: str, value: Any, tp: Any) -> Any:
    """Coerce a YAML, env or flag value to the field's type, or raise ConfigError."""
    value = _plain(value, tp)  # from_dict's mapping may hold what code holds
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        raise ConfigError(name, value, describe(tp) + closest(str(value), map(str, choices)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        if type(value) is int and value in (0, 1):  # YAML's 1 and 0, as "1" and "0" are on the command line
            return bool(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except (ValueError, OverflowError):  # an integer too large for a float overflows
                pass
            else:
                if math.isfinite(number):
                    return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # YAML read it as a number, so its text is gone (0750 is 488, 2024_01 is 202401, 1.10 is 1.1)
            raise ConfigError(name, value, "a string: in a YAML file, write it in quotes")
        if isinstance(value, bool):  # YAML reads yes, no, on and off as true and false
            raise ConfigError(name, value, "a string: in a YAML file, write it in quotes ('yes', 'off')")
    raise ConfigError(name, value, describe(tp))


def _is_a(value: Any, tp: Any) -> bool:
    """Whether a value set in code has the field's type (an int is a float; a bool is neither)."""
    if get_origin(tp) is Literal:
        return value in get_args(tp)
    if tp is bool:
        return isinstance(value, bool)
    if tp is float:
        return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and math.isfinite(value)
    return isinstance(value, tp) and not isinstance(value, bool)


def _at_least(name: str, value: float, low: float) -> None:
    if value < low:
        kind = "an integer" if isinstance(value, int) else "a number"
        raise ConfigError(name, value, f"{kind} >= {low}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(name, value, "a number > 0")


def _fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(name, value, "a number in [0, 1)")


def _component(field: str, name: str, builtins: dict[str, str]) -> None:
    """A built-in name or the form package.module:Class; whether that class imports is the registry's to say."""
    module, colon, cls = name.partition(":")
    if name in builtins or (colon and module and cls and not module.startswith(".")):
        return
    choices = f"one of {', '.join(builtins)} or " if builtins else ""
    raise ConfigError(field, name, f"{choices}package.module:Class{closest(name, builtins)}")


def _placed(key: str, names: set[str]) -> str:
    """' (did you mean training.epochs?)' for a field given at the top level, else the closest top-level name."""
    owners = [f"{s}.{key}" for s, cls in sections().items() if key in {f.name for f in dataclasses.fields(cls)}]
    if owners:
        return f" (did you mean {' or '.join(owners)}?)"
    return closest(key, names) or f": one of {sorted(names)}"


def _undecoded(text: str) -> bool:
    """Whether ``text`` holds bytes that were not UTF-8, as Python decodes them from argv and the environment."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _noted(error: ConfigError, note: str) -> ConfigError:
    return ConfigError(error.field, error.value, error.allowed + note)


if __name__ == "__main__":  # docs/config.md
    from llm.training.core.config_sources import reference

    print(reference(), end="")
