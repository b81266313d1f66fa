"""Import a Hugging Face GPT-2, Llama, Mistral, Qwen2 or Qwen3 as a checkpoint: ``python -m llm.import_hf HF_DIR --out DIR``.

HF_DIR is a ``transformers`` model folder on this machine (``config.json``, the
weights as ``model.safetensors``, shards with their ``.index.json``, or
``pytorch_model.bin``, and a tokenizer: ``tokenizer.json``, or GPT-2's
``vocab.json`` and ``merges.txt``). Nothing is downloaded. DIR gets a checkpoint
that every tool takes (``llm.generate --checkpoint DIR``, ``llm.evaluate``,
``llm.export``) and ``finetune.yaml``, the settings that train on from it:
``python -m llm.training.train --config DIR/finetune.yaml --data-path FILE``.
The weights are read as float32, and the model computes the logits the
``transformers`` one does (see ``llm.models.hf.from_hf_state_dict`` for what
it takes, and refuses).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import NoReturn

import torch
import yaml
from safetensors.torch import load_file

from llm.cli import ArgParser, run_program, run_tool
from llm.data.tokenizers import HFTokenizer, Tokenizer, load_tokenizer
from llm.errors import UsageError, one_line
from llm.files import refuse_checkpoint_folder, write_atomically
from llm.models.gpt import GPT, GPTConfig
from llm.models.hf import NoOurForm, from_hf_state_dict
from llm.training.core.checkpoint import CheckpointManager, load_weights_strictly, unwritable_reason
from llm.training.tasks.lm_task import MODEL_CONFIG, TOKENIZER

FINETUNE = "finetune.yaml"
"""The settings, written beside the checkpoints, that train on from the imported weights."""


def import_hf(hf_dir: str | Path, out: str | Path) -> tuple[Path, GPTConfig, str]:
    """Write ``out/checkpoints/step_00000000`` and ``out/finetune.yaml`` from the model in ``hf_dir``; returns the
    checkpoint, the model's config and the architecture read."""
    hf_dir, out = Path(hf_dir), Path(out)
    if os.path.basename(os.path.normpath(out)) in (".", ".."):  # no rename can replace the folder so named
        raise UsageError(f"--out {out} names the current folder or its parent: name a new folder, such as "
                         f"{out / 'imported'}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty folder: import into a new one")
    refuse_checkpoint_folder(out, "import into a new folder elsewhere")
    problem = unwritable_reason(out.parent)
    if problem:  # found before the weights are read, which can take minutes
        raise UsageError(f"--out: cannot write {out}: {problem}; choose a writable folder")
    hf_config = _read_config(hf_dir)
    try:
        config, state = from_hf_state_dict(hf_config, _read_weights(hf_dir))
    except NoOurForm as e:
        raise UsageError(f"{hf_dir}: {e}") from None
    model = GPT.from_weights(config, state, lambda model, weights: load_weights_strictly(
        model, weights, f"the weights in {hf_dir}", " than its config.json describes", assign=True))
    del state  # the weights as read, which the model holds now in float32
    tokenizer = _read_tokenizer(hf_dir)
    if tokenizer.vocab_size > config.vocab_size:
        raise UsageError(f"{hf_dir}: its tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocab_size {config.vocab_size}")
    architecture = (hf_config.get("architectures") or [hf_config["model_type"]])[0]

    def write_extra(staging: Path) -> None:
        tokenizer.save(staging / TOKENIZER)
        write_atomically(staging / MODEL_CONFIG, json.dumps(config.to_dict(), indent=2) + "\n")
        write_atomically(staging / "config.yaml", yaml.safe_dump(_settings(config, None, None), sort_keys=False))

    # written beside --out and moved into its place whole: an import stopped halfway leaves nothing there
    staging = out.parent / f".{out.name}.importing"
    shutil.rmtree(staging, ignore_errors=True)  # an earlier import's, stopped
    try:
        ckpt = CheckpointManager(staging / "checkpoints").save(0, {"model": model.state_dict(), "imported_from": str(
            hf_dir.resolve())}, {}, write_extra=write_extra)
        ckpt = out / "checkpoints" / ckpt.name
        settings = _settings(config, ckpt / TOKENIZER, out)
        separator = _separator(hf_config, tokenizer)
        if separator:
            settings["data"]["separator"] = separator
        write_atomically(staging / FINETUNE, f"# train on from {hf_dir.resolve()} ({architecture}), imported by "
                                             f"llm.import_hf\n" + yaml.safe_dump(settings, sort_keys=False))
        os.replace(staging, out)  # onto nothing, or an empty folder
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ckpt, config, architecture


def _settings(config: GPTConfig, tokenizer: Path | None, out: Path | None) -> dict:
    """The settings of a language model of ``config``: the checkpoint's config.yaml, and, with the tokenizer file
    and the folder to start from, the fine-tune's."""
    settings: dict = {"task": "lm", "model": config.to_dict()}  # GPTConfig's fields are model's, by name
    if tokenizer is not None:
        settings["data"] = {"tokenizer": str(tokenizer.resolve())}
        settings["checkpoint"] = {"init_from": str(out.resolve())}
        settings["optimizer"] = FINE_TUNE_OPTIMIZER
    return settings


FINE_TUNE_OPTIMIZER = {"lr": 3e-5, "scheduler": "constant"}
"""A fine-tune's optimizer settings, where training from scratch takes 1e-3 and a cosine to 0: pretrained weights
take a rate 30 times smaller (nanoGPT's fine-tune of GPT-2 on Shakespeare: 3e-5, constant), which a larger one
would pull away from what they learned."""


def _separator(hf_config: dict, tokenizer: Tokenizer) -> str:
    """What ends a document and starts the next in the model's own tokens, to put between a fine-tune's files: its
    end-of-text token, then its beginning-of-text token where that is another ("</s><s>" for Llama 2,
    "<|endoftext|>" for GPT-2); each only where the config names it and the tokenizer holds it as a special token
    ("" for neither)."""
    texts = []
    for key in ("eos_token_id", "bos_token_id"):
        named = hf_config.get(key)
        token = named[0] if isinstance(named, list) and named else named  # Llama 3.1's several ends: the first
        text = tokenizer.special.get(token) if isinstance(token, int) and not isinstance(token, bool) else None
        if text and text not in texts:
            texts.append(text)
    return "".join(texts)


def _read_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{hf_dir} holds no config.json: name a transformers model folder") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"cannot read {path}: {one_line(e)}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} holds a {type(data).__name__}, not a model config")
    return data


def _read_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the model's weights: one safetensors file, shards an index lists, or a torch file."""
    for index_name, read in (("model.safetensors.index.json", load_file),
                             ("pytorch_model.bin.index.json", _load_torch)):
        index = hf_dir / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UsageError(f"cannot read {index}: {one_line(e)}") from None
            return {k: v for shard in shards for k, v in _read(hf_dir / shard, read).items()}
    if (hf_dir / "model.safetensors").is_file():
        return _read(hf_dir / "model.safetensors", load_file)
    if (hf_dir / "pytorch_model.bin").is_file():
        return _read(hf_dir / "pytorch_model.bin", _load_torch)
    raise UsageError(f"{hf_dir} holds no weights (model.safetensors, pytorch_model.bin, or an index of shards)")


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs


def _read(path: Path, read) -> dict[str, torch.Tensor]:
    try:
        return read(path)
    except Exception as e:  # noqa: BLE001 - a damaged, truncated or foreign file: one line naming it
        raise UsageError(f"cannot read the weights in {path}: {type(e).__name__}: {one_line(e)}") from None


def _read_tokenizer(hf_dir: Path) -> Tokenizer:
    """The model's tokenizer: its tokenizer.json, or GPT-2's byte-level BPE from vocab.json and merges.txt."""
    if (hf_dir / TOKENIZER).is_file():
        return load_tokenizer(hf_dir / TOKENIZER)
    vocab, merges = hf_dir / "vocab.json", hf_dir / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise UsageError(f"{hf_dir} holds no tokenizer.json (nor vocab.json and merges.txt): the model's tokens "
                         f"cannot be read without its tokenizer")
    import tokenizers
    from tokenizers import ByteLevelBPETokenizer

    try:
        bpe = ByteLevelBPETokenizer(str(vocab), str(merges))
    except Exception as e:  # noqa: BLE001 - a malformed vocabulary or merges file: one line naming them
        raise UsageError(f"cannot read the tokenizer in {vocab} and {merges}: {one_line(e)}") from None
    # what transformers reads as special beside them: GPT-2's end of text, and tokens added since, in id order
    special = {"<|endoftext|>": bpe.token_to_id("<|endoftext|>")} if bpe.token_to_id("<|endoftext|>") is not None \
        else {}
    special |= _added_tokens(hf_dir)
    bpe.add_special_tokens([token for token, _ in sorted(special.items(), key=lambda item: item[1])])
    moved = next((f"{token} ({i} there, {bpe.token_to_id(token)} here)" for token, i in special.items()
                  if bpe.token_to_id(token) != i), None)
    if moved:  # ids with gaps between them: the model's rows would be read for other tokens
        raise UsageError(f"{hf_dir}: an added token would get another id: {moved}; give the model's tokenizer.json")
    return HFTokenizer(tokenizers.Tokenizer.from_str(bpe.to_str()))


def _added_tokens(hf_dir: Path) -> dict[str, int]:
    """Tokens added to a GPT-2 vocabulary, by id: ``added_tokens.json``, and ``tokenizer_config.json``'s
    ``added_tokens_decoder``."""
    added: dict[str, int] = {}
    try:
        if (hf_dir / "added_tokens.json").is_file():
            added |= {str(k): int(v) for k, v in json.loads((hf_dir / "added_tokens.json").read_text()).items()}
        if (hf_dir / "tokenizer_config.json").is_file():
            decoder = json.loads((hf_dir / "tokenizer_config.json").read_text()).get("added_tokens_decoder") or {}
            added |= {str(entry["content"]): int(i) for i, entry in decoder.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise UsageError(f"cannot read the added tokens in {hf_dir}: {one_line(e)}") from None
    return added


def main(argv: list[str] | None = None) -> int:
    return run_tool(lambda: _import(argv), if_interrupted="nothing was imported: import again")


def _import(argv: list[str] | None) -> str:
    parser = ArgParser(prog="llm-import-hf", description="Import a Hugging Face GPT-2, Llama, Mistral, Qwen2 or Qwen3 model "
                                                         "folder as a checkpoint, with the settings to fine-tune it.")
    parser.add_argument("hf_dir", help="a transformers model folder: config.json, weights, tokenizer")
    parser.add_argument("--out", required=True, help="a new folder for the checkpoint and finetune.yaml")
    args = parser.parse_args(argv)
    ckpt, config, architecture = import_hf(args.hf_dir, args.out)
    return (f"imported {architecture} ({config.n_layer} layers, {config.n_embd} wide, context {config.block_size}, "
            f"vocabulary {config.vocab_size}) into {ckpt}; fine-tune with python -m llm.training.train --config "
            f"{Path(args.out) / FINETUNE} --data-path FILE")


def run() -> NoReturn:
    """The command line's entry (llm-import-hf, ``python -m llm.import_hf``): main() as a process (cli.run_program)."""
    run_program(main)


if __name__ == "__main__":
    run()
