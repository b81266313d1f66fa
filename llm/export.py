"""Export a checkpoint's model weights: ``python -m llm.export CHECKPOINT --out model.safetensors``.

Writes the consolidated weights as safetensors and, beside them
(``model.json`` for ``model.safetensors``), the task, the model's config and
the run's full config, so the weights can be rebuilt without this package's
checkpoint format. CHECKPOINT is one checkpoint, a directory of them, or a run
directory (its newest valid checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from llm.errors import EXIT_USAGE, UsageError
from llm.training.core.checkpoint import load_shared_state, model_weights, resolve_checkpoint


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``out`` (safetensors) and its ``.json`` description; returns the checkpoint used."""
    ckpt = resolve_checkpoint(checkpoint)
    state = load_shared_state(ckpt)
    model = model_weights(ckpt)
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise UsageError(f"{ckpt} holds no model weights")
    # clone: tied weights share storage, and safetensors refuses shared tensors
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in model.items()}
    config = state.get("config") or yaml.safe_load((ckpt / "config.yaml").read_text())
    model_config_file = ckpt / "model_config.json"
    description = {
        "task": config["task"],
        "step": state["progress"]["step"],
        "model_config": json.loads(model_config_file.read_text()) if model_config_file.exists() else config["model"],
        "config": config,
    }
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt", "task": str(config["task"])})
        os.replace(tmp, out)
        out.with_suffix(".json").write_text(json.dumps(description, indent=2) + "\n")
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from None
    return ckpt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint, a directory of checkpoints, or a run directory")
    parser.add_argument("--out", required=True, help="where to write the .safetensors file")
    args = parser.parse_args(argv)
    try:
        ckpt = export(args.checkpoint, args.out)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"exported {ckpt} to {args.out} (+ {Path(args.out).with_suffix('.json').name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
