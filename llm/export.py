"""Export a checkpoint's model weights: ``python -m llm.export CHECKPOINT --out model.safetensors``.

Writes the consolidated weights as safetensors and, beside them
(``model.json`` for ``model.safetensors``), the task, the model's config and
the run's full config, so the weights can be rebuilt without this package's
checkpoint format. CHECKPOINT is one checkpoint, a directory of them, or a run
directory (its newest valid checkpoint).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from llm.errors import EXIT_USAGE, UsageError
from llm.generate import ArgParser
from llm.training.core.checkpoint import load_shared_state, model_weights, resolve_checkpoint
from llm.training.tasks.lm_task import MODEL_CONFIG, check_lm_weights


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``out`` (safetensors) and its ``.json`` description; returns the checkpoint used."""
    out = Path(out)
    check_out(out)  # before loading: a big checkpoint takes a while
    ckpt = resolve_checkpoint(checkpoint)
    state = load_shared_state(ckpt)
    model = model_weights(ckpt)
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise UsageError(f"{ckpt} holds no model weights")
    model_config_file = ckpt / MODEL_CONFIG
    if model_config_file.is_file():  # a language model: the weights must be the model its config describes
        check_lm_weights(ckpt, model)
    # clone: tied weights share storage, and safetensors refuses shared tensors
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in model.items()}
    config = _run_config(ckpt, state)
    is_lm = model_config_file.is_file()
    description = {
        "task": config["task"],
        "step": (state.get("progress") or {}).get("step"),
        "model_config": json.loads(model_config_file.read_text()) if is_lm else config.get("model"),
        "config": config,
    }
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt", "task": str(config["task"])})
        os.replace(tmp, out)
        out.with_suffix(".json").write_text(json.dumps(description, indent=2) + "\n")
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from None
    return ckpt


def check_out(out: Path) -> None:
    """Refuse an ``--out`` whose weights or description would replace a file that is not an earlier export."""
    description = out.with_suffix(".json")
    if out.suffix == ".json":
        raise UsageError(f"--out {out}: the description is written beside the weights as {description.name}, "
                         f"so the weights need another suffix, such as .safetensors")
    folder = next((p for p in out.parents if p.exists()), Path("."))
    if not folder.is_dir():
        raise UsageError(f"--out {out}: {folder} is a file, not a folder")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder: name the file to write, such as {out / 'model.safetensors'}")
    if out.exists() and not _is_safetensors(out):
        raise UsageError(f"--out {out} exists and is not a safetensors file, so it is left as it is: "
                         f"choose another --out")
    if description.exists() and not _is_description(description):
        raise UsageError(f"--out {out}: {description} exists and is not the description of an export, "
                         f"so it is left as it is: choose another --out")


def _is_safetensors(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt"):
            return True
    except Exception:  # noqa: BLE001 - safetensors reports a bad header as several exception types
        return False


def _is_description(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and {"task", "model_config", "config"} <= data.keys()


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
    parser = ArgParser(prog="llm-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint, a directory of checkpoints, or a run directory")
    parser.add_argument("--out", required=True, help="where to write the .safetensors file")
    try:
        args = parser.parse_args(argv)
        ckpt = export(args.checkpoint, args.out)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"exported {ckpt} to {args.out} (+ {Path(args.out).with_suffix('.json').name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
