"""Our GPT as a Hugging Face ``transformers`` GPT-2 (``GPT2LMHeadModel``): config and weights.

Pure tensor renaming, no ``transformers`` import: :func:`to_gpt2_state_dict`
gives the ``config.json`` contents and the state dict of an equivalent GPT-2,
so that both models compute the same logits. That holds only for the GPTs
GPT-2 can express (:data:`GPT2_SHAPE`); the rest raise ValueError.

Why each choice is exact:

- ``F.gelu`` is the erf GELU, which ``activation_function="gelu"`` selects
  (``"gelu_new"``, GPT-2's own, is the tanh approximation).
- GPT-2's ``Conv1D`` computes ``x @ W + b`` with W shaped (in, out): the
  transpose of ``nn.Linear``'s (out, in).
- ``c_attn`` splits its output into q, k, v of n_embd each, then each into
  heads of head_dim, as our ``qkv`` does; both scale scores by 1/sqrt(head_dim).
- A model trained without biases equals one whose biases are all zero.
"""

from __future__ import annotations

import torch

from llm.models.gpt import GPTConfig

GPT2_SHAPE = {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu"}
"""The GPTConfig values GPT-2's architecture has; other values have no GPT-2 form."""


class NotGPT2(ValueError):
    """The GPTConfig settings GPT-2 cannot express: ``mismatches`` holds ``(field, value, needed)`` for each."""

    def __init__(self, mismatches: list[tuple[str, object, str]]):
        self.mismatches = mismatches
        has = ", ".join(f"{field}={value!r}" for field, value, _ in mismatches)
        needs = ", ".join(f"{field}={needed!r}" for field, _, needed in mismatches)
        super().__init__(f"GPT-2 has no {has}: it needs {needs}")


def check_gpt2_shape(config: GPTConfig) -> None:
    """Raise :class:`NotGPT2` naming every setting of ``config`` that GPT-2 cannot express, so that
    one retrain fixes them all."""
    mismatches = [(field, getattr(config, field), needed) for field, needed in GPT2_SHAPE.items()
                  if getattr(config, field) != needed]
    if mismatches:
        raise NotGPT2(mismatches)


def to_gpt2_state_dict(
    state: dict[str, torch.Tensor], config: GPTConfig
) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(hf_config_dict, hf_state)`` for ``GPT2LMHeadModel``, from the state dict of ``GPT(config)``.

    The tensors are new (transposed or cloned), on the CPU, sharing no storage, so
    they can be saved with safetensors. A tied output head is left out, as
    ``save_pretrained`` does: ``tie_word_embeddings`` restores it on load.
    """
    check_gpt2_shape(config)
    taken: set[str] = set()

    def take(name: str, transpose: bool = False) -> torch.Tensor:
        if name not in state:
            raise ValueError(f"no {name} in the weights: they are not those of a GPT with this config")
        taken.add(name)
        t = state[name].detach().cpu()
        return (t.t() if transpose else t).contiguous().clone()

    def bias(name: str, size: int, like: torch.Tensor) -> torch.Tensor:
        return take(name) if config.bias else torch.zeros(size, dtype=like.dtype)

    def linear(ours: str, theirs: str, out_features: int) -> dict[str, torch.Tensor]:
        weight = take(f"{ours}.weight", transpose=True)  # Conv1D: (in, out)
        return {f"{theirs}.weight": weight, f"{theirs}.bias": bias(f"{ours}.bias", out_features, weight)}

    def norm(ours: str, theirs: str) -> dict[str, torch.Tensor]:
        weight = take(f"{ours}.weight")
        return {f"{theirs}.weight": weight, f"{theirs}.bias": bias(f"{ours}.bias", config.n_embd, weight)}

    c = config
    hf = {"transformer.wte.weight": take("tok_emb.weight"), "transformer.wpe.weight": take("pos_emb.weight")}
    for i in range(c.n_layer):
        ours, theirs = f"blocks.{i}", f"transformer.h.{i}"
        hf |= norm(f"{ours}.norm1", f"{theirs}.ln_1")
        hf |= linear(f"{ours}.attn.qkv", f"{theirs}.attn.c_attn", 3 * c.n_embd)
        hf |= linear(f"{ours}.attn.proj", f"{theirs}.attn.c_proj", c.n_embd)
        hf |= norm(f"{ours}.norm2", f"{theirs}.ln_2")
        hf |= linear(f"{ours}.mlp.fc", f"{theirs}.mlp.c_fc", 4 * c.n_embd)
        hf |= linear(f"{ours}.mlp.proj", f"{theirs}.mlp.c_proj", c.n_embd)
    hf |= norm("norm_f", "transformer.ln_f")
    if c.tie_embeddings:
        taken.add("lm_head.weight")  # the same matrix as tok_emb.weight
    else:
        hf["lm_head.weight"] = take("lm_head.weight")
    left = sorted(set(state) - taken)
    if left:  # a tensor the mapping does not know would be dropped silently
        raise ValueError(f"weights with no GPT-2 counterpart: {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}")

    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,  # older transformers versions read the context length from here
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": 4 * c.n_embd,
        "activation_function": "gelu",  # erf GELU, as F.gelu; not GPT-2's tanh "gelu_new"
        "layer_norm_epsilon": 1e-5,  # as make_norm
        # our one dropout sits where GPT-2 has its three: after the embeddings, on the
        # attention weights, and after each residual projection (attention and MLP)
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "resid_pdrop": c.dropout,
        "scale_attn_weights": True,  # 1/sqrt(head_dim), as scaled_dot_product_attention
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": 0.02,  # as GPT._init_weights, for any newly added weights
        # GPT-2's defaults (50256) name a token our vocabulary need not have
        "bos_token_id": None,
        "eos_token_id": None,
    }
    return hf_config, hf
