"""Export a checkpoint's model weights: ``python -m llm.export --checkpoint PATH --out model.safetensors``.

Writes the consolidated weights as safetensors and, beside them
(``model.json`` for ``model.safetensors``), the task, the model's config and
the run's full config, so the weights can be rebuilt without this package's
checkpoint format; for a language model, its tokenizer too
(``model.tokenizer.json``). PATH is one checkpoint, a directory of them, or a run
directory (its newest valid checkpoint), or ``<checkpoints>/best`` (the best by the
run's checkpoint.monitor).

``--format hf --out DIR`` writes a language model as a Hugging Face
``transformers`` model instead, a Llama (``LlamaForCausalLM``: rotary positions,
RMSNorm, SwiGLU, the defaults; a ``Qwen2ForCausalLM`` with biases in the query, key
and value projections alone; a ``Qwen3ForCausalLM`` with each head's query and key
normalised, ``model.qk_norm``) or a GPT-2 (``GPT2LMHeadModel``: learned
positions, LayerNorm, GELU or its tanh form), which ``AutoModelForCausalLM.from_pretrained(DIR)``
loads: ``config.json``, ``model.safetensors`` and, for a Hugging Face tokenizer,
``tokenizer.json`` with a ``tokenizer_config.json`` that loads it as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NoReturn

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llm.cli import ArgParser, add_checkpoint, run_program, run_tool
from llm.data.tokenizers import HFTokenizer, load_tokenizer
from llm.errors import UsageError
from llm.files import refuse_checkpoint_folder, replacing
from llm.models.gpt import GPTConfig
from llm.models.hf import HF_NAMES, HF_SHAPES, NoHFForm, as_qwen2, shape_mismatches, to_hf_state_dict
from llm.training.core.checkpoint import load_shared_state, model_weights, read_checkpoint
from llm.training.tasks.lm_task import MODEL_CONFIG, TOKENIZER, check_lm_weights

FORMATS = ("safetensors", "hf")
HF_WEIGHTS, HF_CONFIG, HF_TOKENIZER_CONFIG = "model.safetensors", "config.json", "tokenizer_config.json"
HF_FILES = (HF_CONFIG, HF_WEIGHTS, TOKENIZER, HF_TOKENIZER_CONFIG)
"""What ``--format hf`` writes; a folder holding nothing else may be written over."""
HF_MARK = ("llm_export", "hf")
"""The metadata entry of an --format hf export's weights: its folder may be exported into again."""


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``out`` (safetensors) and its ``.json`` description; returns the checkpoint used."""
    check_out(out)  # before loading: a big checkpoint takes a while
    out = Path(out)
    ckpt, tensors, description, tokenizer = read_checkpoint(checkpoint, _read_for_export)
    description = {"weights": out.name, **({"tokenizer": tokenizer_of(out).name} if tokenizer is not None else {}), **description}
    metadata = {"format": "pt", "task": str(description["task"])}
    files = {out: lambda tmp: _save_safetensors(tensors, tmp, metadata, staging_of(out))}
    if tokenizer is not None:
        files[tokenizer_of(out)] = lambda tmp: tmp.write_bytes(tokenizer)
    files[description_of(out)] = lambda tmp: tmp.write_text(json.dumps(description, indent=2) + "\n")
    # an earlier export's tokenizer at this --out (check_out let it through), which these weights do not use, goes
    _write_together(out.parent, files, stale=[] if tokenizer is not None else [tokenizer_of(out)])
    return ckpt


def _write_together(folder: Path, files: dict[Path, Callable[[Path], None]], stale: Iterable[Path] = ()) -> None:
    """Write each of ``files`` (``write(tmp)``) to a temporary file beside it, and only once all are written
    rename them into place, in order, then delete ``stale``: a failed or interrupted export leaves an earlier
    one to the same place as it was, not new weights beside an old description. The weights go first: theirs
    is the mark that lets an export that was stopped among the renames be made again to the same place."""
    writing = folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as renames:  # replacing() renames as it exits: in reverse, once all are written
            for path, write in reversed(files.items()):
                writing = path
                write(renames.enter_context(replacing(path)))
            writing = folder
        for path in stale:
            path.unlink(missing_ok=True)
    except (OSError, SafetensorError) as e:
        raise UsageError(f"cannot write {writing}: {_why_not_written(e)}") from None


def _why_not_written(error: OSError | SafetensorError) -> str:
    """Why a write failed, in OSError's words: safetensors raises its own error for its own writes, saying
    "Error while serializing: I/O error: No space left on device (os error 28)"."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    code = re.search(r"\(os error (\d+)\)", str(error))
    return os.strerror(int(code.group(1))) if code else str(error)


def _read_for_export(ckpt: Path) -> tuple[Path, dict[str, torch.Tensor], dict, bytes | None]:
    """``ckpt``, its weights as safetensors takes them, the description written beside them, and its tokenizer
    (a language model's, any kind), read here with the rest: read_checkpoint sees whether the checkpoint
    stayed whole meanwhile."""
    state = load_shared_state(ckpt, mmap=True)  # the weights alone are read, by the copies below
    model = model_weights(ckpt, state)
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise UsageError(f"{ckpt} holds no model weights")
    model_config_file = ckpt / MODEL_CONFIG
    is_lm = model_config_file.is_file()
    if is_lm:  # a language model: the weights must be the model its config describes
        check_lm_weights(ckpt, model)
    # clone: tied weights share storage, and safetensors refuses shared tensors
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in model.items()}
    config = _run_config(ckpt, state)
    tokenizer = (ckpt / TOKENIZER).read_bytes() if (ckpt / TOKENIZER).is_file() else None
    return ckpt, tensors, {
        "task": config["task"],
        "step": (state.get("progress") or {}).get("step"),
        "model_config": json.loads(model_config_file.read_text()) if is_lm else config.get("model"),
        "config": config,
    }, tokenizer


def export_hf(checkpoint: str | Path, out: str | Path) -> tuple[Path, str, bool]:
    """Write the folder ``out`` for ``transformers`` (a Llama, a Qwen2, a Qwen3 or a GPT-2); returns the checkpoint, the
    architecture and whether the tokenizer went with it (only a Hugging Face one has a form transformers reads)."""
    out = Path(out)
    check_hf_out(out)
    transformers = _import_transformers()  # before loading: a big checkpoint takes a while
    ckpt, weights, config, tokenizer_json = read_checkpoint(checkpoint, _read_for_hf)
    try:
        hf_config, hf_state = to_hf_state_dict(weights, config)
    except NoHFForm as e:
        raise UsageError(f"--format hf: {_no_hf_form(config, e)}") from None
    del weights
    architecture = hf_config["architectures"][0]
    model_config = transformers.AutoConfig.for_model(**hf_config)  # its class by hf_config's model_type
    _check_hf_names(transformers, architecture, model_config, hf_state)
    # transformers reads "format" only; the mark tells a folder that a new export may replace
    metadata = {"format": "pt", HF_MARK[0]: HF_MARK[1]}
    files = {out / HF_WEIGHTS: lambda tmp: _save_safetensors(hf_state, tmp, metadata, staging_of(out / HF_WEIGHTS)),
             out / HF_CONFIG: lambda tmp: model_config.to_json_file(tmp, use_diff=True)}  # as save_pretrained
    tokenizer_files = [out / TOKENIZER, out / HF_TOKENIZER_CONFIG]
    if tokenizer_json is not None:
        files[out / TOKENIZER] = lambda tmp: tmp.write_bytes(tokenizer_json)
        # without it AutoTokenizer takes the model type's own tokenizer class, which adds
        # GPT-2's <|endoftext|> or Llama's <s>; this class loads tokenizer.json as it is
        files[out / HF_TOKENIZER_CONFIG] = lambda tmp: tmp.write_text(
            json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}) + "\n")
    _write_together(out, files, stale=[] if tokenizer_json is not None else tokenizer_files)  # none stale
    return ckpt, architecture, tokenizer_json is not None


def _no_hf_form(config: GPTConfig, error: NoHFForm) -> str:
    """What a model of no transformers form has and needs: every setting at once, so one retrain does; the
    nearest architecture first."""
    def flags(mismatches: list[tuple[str, object, str]]) -> str:
        return " ".join(f"--model-{field.replace('_', '-')} {needed}" for field, _, needed in mismatches)

    def named(architecture: str) -> str:
        return HF_NAMES[as_qwen2(config, architecture)]

    has = ", ".join(f"model.{field} {value}" for field, value, _ in error.mismatches)
    nearest = named(error.architecture)
    lacks = {name: shape_mismatches(config, name) for name in HF_SHAPES if name != error.architecture}
    others = "; ".join(f"with {flags(mismatches)} for a {named(name)}" for name, mismatches in lacks.items())
    return (f"{has} {'has' if len(error.mismatches) == 1 else 'have'} no {nearest} form, and the model no other "
            f"Hugging Face one; train with {flags(error.mismatches)} to export a {nearest} (or {others})")


def _read_for_hf(ckpt: Path) -> tuple[Path, dict[str, torch.Tensor], GPTConfig, bytes | None]:
    """``ckpt``, its language model's weights and config, and its tokenizer.json if it is a Hugging Face one.

    A vocabulary padded past the tokenizer's (model.vocab_size) is cut back to it:
    transformers would otherwise sample the padded ids, which no tokenizer decodes.
    """
    if not (ckpt / MODEL_CONFIG).is_file():
        raise UsageError(f"--format hf exports language models (--task lm): {ckpt} has no {MODEL_CONFIG}")
    weights = model_weights(ckpt)
    if not isinstance(weights, dict):
        raise UsageError(f"{ckpt} holds no model weights")
    config = check_lm_weights(ckpt, weights)
    tokenizer = ckpt / TOKENIZER
    loaded = load_tokenizer(tokenizer) if tokenizer.is_file() else None
    if loaded is not None and loaded.vocab_size < config.vocab_size:
        for name in ("tok_emb.weight", "lm_head.weight"):  # the head is absent from a tied model's weights
            if name in weights:
                weights[name] = weights[name][:loaded.vocab_size]
        config = dataclasses.replace(config, vocab_size=loaded.vocab_size)
    if not isinstance(loaded, HFTokenizer):
        return ckpt, weights, config, None
    # training encodes without the special tokens a post-processor adds (<s>, [CLS] ... [SEP]): so must the export
    document = json.loads(tokenizer.read_bytes())
    document["post_processor"] = None
    return ckpt, weights, config, json.dumps(document, ensure_ascii=False).encode()


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], staging: Path) -> None:
    """``save_file`` to the new file ``path`` (a temporary one: see _write_together), by way of the folder
    ``staging`` (``staging_of`` the weights).

    save_file writes a temporary file of its own (``.tmpXXXXXX``) beside the path it is given, then renames it:
    an export killed meanwhile left that file, as big as the weights, under a name no export knows, in the
    folder a new export of ``--format hf`` must find holding its own files alone. Written in the staging
    folder, which each export removes first, it is found and removed. (``safetensors.torch.save`` would need no
    file, but holds all of the weights a second time in memory, as bytes.)

    safetensors makes its files 0600; the export gets the mode every other new file gets (0666 less the
    umask), read off the file as ``open`` creates it rather than by setting the process's umask.
    """
    path.touch()
    mode = stat.S_IMODE(path.stat().st_mode)
    shutil.rmtree(staging, ignore_errors=True)  # what an export killed here left
    staging.mkdir()
    try:
        staged = staging / path.name
        save_file(tensors, str(staged), metadata=metadata)
        os.chmod(staged, mode)
        os.rename(staged, path)  # onto the empty file made above; the rename into place comes with the others
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def staging_of(weights: Path) -> Path:
    """The folder beside ``weights`` where safetensors writes them: ``.model.safetensors.staging`` for
    ``model.safetensors``."""
    return weights.with_name(f".{weights.name}.staging")


def check_hf_out(out: Path) -> None:
    """Refuse an ``--out`` for ``--format hf`` unless it is a new or empty folder, or an earlier such export."""
    refuse_checkpoint_folder(out, "export elsewhere")
    if out.suffix in (".safetensors", ".json"):
        raise UsageError(f"--out {out}: --format hf writes a folder (config.json, model.safetensors, ...), "
                         f"not one file: name a folder, such as {out.with_suffix('')}")
    folder = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not folder.is_dir():
        raise UsageError(f"--out {out}: {folder} is a file, not a folder")
    if folder == out:
        ours = {f".{name}.tmp" for name in HF_FILES} | {staging_of(out / HF_WEIGHTS).name}  # left by a killed export
        names = sorted(p.name for p in out.iterdir() if p.name not in ours)
        others = [name for name in names if name not in HF_FILES]
        if others:
            raise UsageError(f"--out {out} holds files --format hf does not write ({', '.join(others[:3])}"
                             f"{', ...' if len(others) > 3 else ''}), so it is left as it is: "
                             f"choose a new or empty folder")
        if names and _metadata(out / HF_WEIGHTS).get(HF_MARK[0]) != HF_MARK[1]:  # those names, of another model
            raise UsageError(f"--out {out} holds {', '.join(names)} of another model (not an earlier export, whose "
                             f"{HF_WEIGHTS} carries its mark), so it is left as it is: choose a new or empty folder")


def _import_transformers():
    try:
        import transformers  # only here: the safetensors export does not need it
    except ImportError:
        raise UsageError("--format hf needs the transformers package: pip install transformers") from None
    return transformers


def _check_hf_names(transformers, architecture: str, config, hf_state: dict[str, torch.Tensor]) -> None:
    """Compare names and shapes with the installed transformers' model, built on the meta device
    (nothing allocated): from_pretrained would only warn about weights it does not find."""
    with torch.device("meta"):
        expected = getattr(transformers, architecture)(config).state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # the embedding, restored on load
    wrong = sorted(set(expected) ^ set(hf_state)) or [
        name for name, t in hf_state.items() if tuple(t.shape) != tuple(expected[name].shape)]
    if wrong:
        raise UsageError(f"transformers {transformers.__version__} lays out {architecture} differently from what "
                         f"this export writes (first difference: {wrong[0]}): "
                         f"please report it, with the transformers version")


TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
"""Suffixes of files that torch.save writes: refused for an export, which is safetensors."""


def check_out(given: str | os.PathLike) -> None:
    """Refuse an ``--out`` whose weights or description would replace a file that is not an earlier export."""
    out = Path(given)
    refuse_checkpoint_folder(out, "export elsewhere")
    # "exports/" and "exports/." name a folder even where none is yet, though Path() drops the "/" and the "."
    if out.is_dir() or os.path.basename(os.fspath(given)) in ("", ".", ".."):
        raise UsageError(f"--out {out} is a folder: name the file to write, such as {out / 'model.safetensors'}")
    if out.suffix.lower() == ".json":  # the name of a description, not of weights
        raise UsageError(f"--out {out}: the weights are safetensors and their description beside them is JSON, "
                         f"so the weights need another suffix, such as .safetensors")
    if out.suffix.lower() in TORCH_SUFFIXES:  # a name that promises what torch.load reads, which it cannot
        raise UsageError(f"--out {out}: the weights are written as safetensors, which torch.load does not read: "
                         f"name them {out.with_suffix('.safetensors')}")
    description = description_of(out)
    folder = next((p for p in out.parents if p.exists()), Path("."))
    if not folder.is_dir():
        raise UsageError(f"--out {out}: {folder} is a file, not a folder")
    if out.exists() and not _is_export(out):
        raise UsageError(f"--out {out} exists and is not an earlier export (a safetensors file with the task in "
                         f"its metadata), so it is left as it is: choose another --out")
    described = _described(description)  # {} where there is none
    if description.exists() and not _is_description(described, of=out):
        raise UsageError(f"--out {out}: {description} exists and is not the description of an export to "
                         f"{out.name}, so it is left as it is: choose another --out")
    tokenizer = tokenizer_of(out)
    if tokenizer.exists() and described.get("tokenizer") != tokenizer.name:
        raise UsageError(f"--out {out}: {tokenizer} exists and is not the tokenizer of an earlier export to "
                         f"{out.name}, so it is left as it is: choose another --out")


def _is_export(path: Path) -> bool:
    """A safetensors file that ``export`` wrote: its metadata names the task (another model's file does not)."""
    return "task" in _metadata(path)


def _metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata; {} for a missing or broken file."""
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 - safetensors reports a bad header as several exception types
        return {}


def description_of(out: Path) -> Path:
    """The ``.json`` beside exported weights: ``model.json`` for ``model.safetensors``, ``gpt-v1.1.json`` for
    ``gpt-v1.1`` (whose ``.1`` is no suffix to replace: ``gpt-v1.2`` would share its description)."""
    return out.with_suffix(".json") if out.suffix == ".safetensors" else out.with_name(out.name + ".json")


def tokenizer_of(out: Path) -> Path:
    """The tokenizer beside a language model's exported weights: ``model.tokenizer.json`` for
    ``model.safetensors``, loaded by ``llm.data.tokenizers.load_tokenizer``."""
    return description_of(out).with_suffix(".tokenizer.json")


def _described(path: Path) -> dict:
    """What an export's description holds; {} for a file that is no JSON object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_description(data: dict, of: Path) -> bool:
    """Whether ``data`` (read by _described) is an export's description, of the weights ``of`` (or of weights it
    does not name)."""
    return {"task", "model_config", "config"} <= data.keys() and data.get("weights", of.name) == of.name


def _run_config(ckpt: Path, state: dict) -> dict:
    """The run's config saved with the checkpoint (in state.pt, else config.yaml)."""
    config = state.get("config")
    if not isinstance(config, dict) and (ckpt / "config.yaml").is_file():
        config = yaml.safe_load((ckpt / "config.yaml").read_text())
    if not isinstance(config, dict) or "task" not in config:
        raise UsageError(f"{ckpt} holds no run config (in state.pt or config.yaml), so the export could not "
                         f"say what the weights are: export a checkpoint saved by llm training")
    return config


def main(argv: list[str] | None = None) -> int:
    # an earlier export to --out is left as it was, unless the stop falls among the renames that end the export
    return run_tool(lambda: _export(argv), if_interrupted="the export may be incomplete: export again")


def _export(argv: list[str] | None) -> str:
    parser = ArgParser(prog="llm-export", description="Export a checkpoint's model weights as safetensors, or as a "
                                                       "Hugging Face Llama, Qwen2, Qwen3 or GPT-2 (--format hf).")
    add_checkpoint(parser)
    parser.add_argument("--out", required=True,
                        help="where to write: the .safetensors file, or for --format hf a folder")
    parser.add_argument("--format", choices=FORMATS, default="safetensors",
                        help="safetensors: our weights and a .json description (default); "
                             "hf: a Hugging Face transformers folder, Llama, Qwen2, Qwen3 or GPT-2 (language models)")
    args = parser.parse_args(argv)
    if args.format != "hf":
        ckpt = export(args.checkpoint, args.out)
        beside = [path.name for path in (description_of(Path(args.out)), tokenizer_of(Path(args.out))) if path.exists()]
        return f"exported {ckpt} to {args.out} (+ {', '.join(beside)})"
    ckpt, architecture, with_tokenizer = export_hf(args.checkpoint, args.out)
    tokenizer = "tokenizer.json" if with_tokenizer else "no tokenizer: only a Hugging Face one has a form transformers reads"
    return (f"exported {ckpt} to {args.out} as a transformers {architecture} "
            f"(config.json, model.safetensors; {tokenizer})")


def run() -> NoReturn:
    """The command line's entry (llm-export, ``python -m llm.export``): main() as a process (cli.run_program)."""
    run_program(main)


if __name__ == "__main__":
    run()
