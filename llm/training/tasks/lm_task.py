"""LMTask: train a GPT on next-token prediction over a text corpus; load_lm: load one back."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from torch import nn, optim

from llm.data.tokenizers import Tokenizer, load_tokenizer
from llm.errors import UsageError, one_line
from llm.files import write_atomically
from llm.models.gpt import GPT, GPTConfig
from llm.training.core.checkpoint import SHARED, load_weights_strictly, model_weights, read_checkpoint
from llm.training.core.config import Config
from llm.training.core.optim import build_optimizer
from llm.training.tasks.base_task import TrainingTask

IGNORE_INDEX = -100
"""A target token with this id adds nothing to the loss (padding, a prompt not to be learned)."""
MODEL_CONFIG, TOKENIZER, CORPUS = "model_config.json", "tokenizer.json", "corpus.json"
"""The files LMTask.save_artifacts writes beside the weights; load_lm needs the first two. The third names
the corpus the training windows came from, so that a resume on an edited one is refused."""


def perplexity(loss: float) -> float:
    """exp(loss): the perplexity of a mean next-token cross-entropy in nats."""
    return math.inf if loss > 700 else math.exp(loss)  # exp overflows past ~709; a NaN loss stays NaN


class LMTask(TrainingTask):
    """Next-token cross-entropy over every position of (inputs, targets) windows."""

    default_data_module = "text"

    def __init__(self, config: Config):
        super().__init__(config)
        self.tokens_per_sample = config.model.block_size

    def gpt_config(self) -> GPTConfig:
        """The model's config: ``config.model`` plus the data module's vocabulary."""
        if self.data_module is None:
            raise RuntimeError("LMTask needs task.data_module (set up) before building the model")
        tokenizer = getattr(self.data_module, "tokenizer", None)
        if tokenizer is None:
            raise UsageError(
                f"task lm needs a data module with a tokenizer (such as text), "
                f"got {type(self.data_module).__name__}"
            )
        m = self.config.model
        if 0 < m.vocab_size < tokenizer.vocab_size:
            raise UsageError(f"model.vocab_size: got {m.vocab_size}, fewer than the tokenizer's "
                             f"{tokenizer.vocab_size} tokens: leave it 0 or give at least {tokenizer.vocab_size}")
        if m.n_layer < 1:  # the config lets an MLP have none; an lm task named by its path gets here
            raise UsageError(f"model.n_layer: got {m.n_layer}, expected an integer >= 1: a GPT has blocks")
        try:
            # GPTConfig's fields are model's, by name: all but the vocabulary are as the config says
            shared = {f.name: getattr(m, f.name) for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"}
            return GPTConfig(vocab_size=m.vocab_size or tokenizer.vocab_size, **shared)
        except ValueError as e:  # what only a GPT needs, which the config checks for task lm alone
            named = str(e).replace("GPTConfig.", "model.")
            raise UsageError(named if named.startswith("model.") else f"model: {named}") from None

    def build_model(self) -> nn.Module:
        return GPT(self.gpt_config())

    def build_optimizer(self, model: nn.Module) -> optim.Optimizer:
        return build_optimizer(model, self.config.optimizer)

    def build_criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")

    def train_step(self, batch, model: nn.Module, criterion: nn.Module) -> tuple[torch.Tensor, dict]:
        x, y = batch
        logits = model(x)
        # a sum over the counted targets, then their mean: a batch with none of them counted (all
        # padding) has loss 0 and weighs nothing, where a plain mean would be 0/0 = nan
        return criterion(logits.flatten(0, 1), y.flatten()) / (y != IGNORE_INDEX).sum().clamp(min=1), {}

    def validation_step(self, batch, model: nn.Module, criterion: nn.Module) -> tuple[torch.Tensor, dict]:
        return self.train_step(batch, model, criterion)

    def loss_weight(self, batch) -> torch.Tensor:
        """Target tokens that count: a data module may mark padding or prompts with IGNORE_INDEX."""
        return (batch[1] != IGNORE_INDEX).sum()

    def finalize_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Add perplexity, exp(mean loss): ``ppl`` from ``loss``, ``val_ppl`` from ``val_loss``."""
        out = dict(metrics)
        for loss_key, ppl_key in (("loss", "ppl"), ("val_loss", "val_ppl")):
            if loss_key in metrics:
                out[ppl_key] = perplexity(float(metrics[loss_key]))
        return out

    def save_artifacts(self, directory: Path) -> None:
        """``tokenizer.json`` and ``model_config.json``, with the weights all a user needs to sample, and
        ``corpus.json``, the digests of the corpus and of the tokens it gave."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.gpt_config()
        self.data_module.tokenizer.save(directory / TOKENIZER)
        write_atomically(directory / MODEL_CONFIG, json.dumps(config.to_dict(), indent=2) + "\n")
        digest = getattr(self.data_module, "corpus_digest", None)  # a data module of the user's may have none
        if digest:  # an edited corpus moves the windows and the split even when its tokenizer comes out the same
            pinned = {"sha256": digest}
            tokens = getattr(self.data_module, "tokens_digest", None)
            if tokens:  # the same corpus tokenized otherwise (by another version of this package) moves them too
                pinned["tokens_sha256"] = tokens
            write_atomically(directory / CORPUS, json.dumps(pinned) + "\n")


def load_lm(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, Path]:
    """A trained GPT in eval mode on ``device``, its tokenizer, and the checkpoint directory they came from.

    ``checkpoint`` is one checkpoint, a directory of checkpoints (the newest valid one is
    taken) or a run directory (its ``checkpoints/``). Raises UsageError with one line when
    the checkpoint is missing, invalid, not a language model, or inconsistent.
    """
    device = usable_device(device)
    model, tokenizer, ckpt = read_checkpoint(Path(checkpoint), _read_lm)
    return model.to(device).eval(), tokenizer, ckpt


def _read_lm(ckpt: Path) -> tuple[GPT, Tokenizer, Path]:
    missing = [name for name in (MODEL_CONFIG, TOKENIZER) if not (ckpt / name).is_file()]
    if missing:
        raise UsageError(f"{ckpt} is not a language-model checkpoint (no {' or '.join(missing)}; "
                         f"those are saved by --task lm)")
    config = _read_model_config(ckpt / MODEL_CONFIG)
    tokenizer = load_tokenizer(ckpt / TOKENIZER)
    if tokenizer.vocab_size > config.vocab_size:  # fewer is a padded vocabulary
        raise UsageError(f"the vocabulary does not fit the model in {ckpt}: {TOKENIZER} has "
                         f"{tokenizer.vocab_size} tokens, {MODEL_CONFIG} says vocab_size {config.vocab_size}")
    state = model_weights(ckpt)
    if not isinstance(state, dict):
        raise UsageError(f"{ckpt / SHARED} holds no model weights (no 'model' entry)")
    model = GPT.from_weights(config, state, lambda model, weights: _load_weights(model, weights, ckpt, assign=True))
    return model, tokenizer, ckpt


def check_lm_weights(ckpt: Path, state: dict) -> GPTConfig:
    """The model config of a language-model checkpoint, once ``state`` is known to be exactly its weights.

    Compares names and shapes against a GPT built on the meta device: no memory, nothing copied.
    """
    config = _read_model_config(Path(ckpt) / MODEL_CONFIG)
    with torch.device("meta"):
        model = GPT(config)
    _load_weights(model, state, Path(ckpt), assign=True)
    return config


def _load_weights(model: GPT, state: dict, ckpt: Path, assign: bool = False) -> None:
    load_weights_strictly(model, state, f"the weights in {ckpt}", f" than its {MODEL_CONFIG} describes", assign)


def _read_model_config(path: Path) -> GPTConfig:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        return GPTConfig.from_dict(data)
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise UsageError(f"{path} is not a valid model config: {one_line(e)}") from None


def usable_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"device: {one_line(e)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' was asked for but no CUDA device is available: use cpu")
    return device
