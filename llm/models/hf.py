"""Our GPT as a Hugging Face ``transformers`` model: GPT-2, Llama, Qwen2 or Qwen3, config and weights.

Pure tensor renaming, no ``transformers`` import: :func:`to_hf_state_dict` gives
the ``config.json`` contents and the state dict of an equivalent
``GPT2LMHeadModel`` (learned positions, LayerNorm, GELU: :data:`HF_SHAPES`) or
``LlamaForCausalLM`` (rotary positions, RMSNorm, SwiGLU: this package's
defaults; ``Qwen2ForCausalLM`` when only the query, key and value projections
have biases; ``Qwen3ForCausalLM`` when each head's query and key are normalised),
so that both models compute the same logits. Other mixes have no
``transformers`` form and raise :class:`NoHFForm`. :func:`from_hf_state_dict`
goes the other way, for the models our GPT computes exactly; others raise
:class:`NoOurForm`.

Why each choice is exact:

- ``F.gelu`` is the erf GELU, which ``activation_function="gelu"`` selects;
  ``"gelu_new"``, GPT-2's own, is its tanh approximation, ``mlp="gelu_tanh"`` here.
- GPT-2's ``Conv1D`` computes ``x @ W + b`` with W shaped (in, out): the
  transpose of ``nn.Linear``'s (out, in).
- ``c_attn`` splits its output into q, k, v of n_embd each, then each into
  heads of head_dim, as our ``qkv`` does; both scale scores by 1/sqrt(head_dim).
  Llama's ``q_proj``, ``k_proj`` and ``v_proj`` are those three row blocks; with
  fewer key-value heads than heads, query head h reads key-value head
  h // (heads / key-value heads) in both (``repeat_kv``; ``enable_gqa``).
- Our :class:`~llm.models.gpt.Rotary` rotates the two halves of each head
  ("rotate half", of base ``rope_theta``), as Llama's default rotary embedding does,
  and stretches its frequencies as Llama 3.1's ``rope_type`` "llama3" does.
- Mistral, Qwen2 and Qwen3 name their weights as Llama does; Qwen2 has biases in
  ``q_proj``, ``k_proj`` and ``v_proj`` only, our ``qkv_bias``; Qwen3 has no
  biases, and an RMSNorm over each head's query and key (``q_norm``, ``k_norm``)
  before the rotary positions, our ``qk_norm``.
- Our SwiGLU ``fc`` is Llama's ``gate_proj`` rows then its ``up_proj`` rows;
  ``silu(gate) * up`` in both.
- A model trained without biases equals one whose biases are all zero (GPT-2
  has them always; Llama has them or not, by ``attention_bias`` and ``mlp_bias``).
"""

from __future__ import annotations

import re

import torch

from llm.models.gpt import GPTConfig, swiglu_hidden

HF_SHAPES = {
    "GPT2LMHeadModel": {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu", "qk_norm": False},
    "LlamaForCausalLM": {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": False},
    "Qwen3ForCausalLM": {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True, "bias": False,
                         "qkv_bias": False},
}
"""The GPTConfig values each ``transformers`` architecture has; other mixes have no form there."""
HF_NAMES = {"GPT2LMHeadModel": "GPT-2", "LlamaForCausalLM": "Llama", "MistralForCausalLM": "Mistral",
            "Qwen2ForCausalLM": "Qwen2", "Qwen3ForCausalLM": "Qwen3"}
LLAMA3_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
"""Llama 3.1's rotary scaling besides its factor: Meta's values, which ``llm.models.gpt.llama3_scaled`` takes."""


class NoHFForm(ValueError):
    """A GPTConfig that ``architecture`` (the nearest of :data:`HF_SHAPES`) cannot express: ``mismatches``
    holds ``(field, value, needed)`` for each setting it lacks."""

    def __init__(self, architecture: str, mismatches: list[tuple[str, object, str]]):
        self.architecture, self.mismatches = architecture, mismatches
        has = ", ".join(f"{field}={value!r}" for field, value, _ in mismatches)
        needs = ", ".join(f"{field}={needed!r}" for field, _, needed in mismatches)
        super().__init__(f"{HF_NAMES[architecture]} has no {has}: it needs {needs}")


def shape_mismatches(config: GPTConfig, architecture: str) -> list[tuple[str, object, str]]:
    """``(field, value, needed)`` for each setting of :data:`HF_SHAPES` that ``config`` lacks for ``architecture``;
    either GELU is GPT-2's ("gelu" or its tanh form, ``activation_function`` "gelu_new")."""
    def value(field: str) -> object:
        return "gelu" if field == "mlp" and config.mlp == "gelu_tanh" else getattr(config, field)

    mismatches = [(field, getattr(config, field), needed) for field, needed in HF_SHAPES[architecture].items()
                  if value(field) != needed]
    if architecture == "GPT2LMHeadModel" and config.kv_heads != config.n_head:
        mismatches.append(("n_kv_head", config.n_kv_head, f"0 or {config.n_head}"))  # GPT-2 has no grouped queries
    if architecture == "GPT2LMHeadModel" and config.attn_width != config.n_embd:
        mismatches.append(("head_size", config.head_size, 0))  # GPT-2's heads are n_embd / n_head wide
    return mismatches


def hf_architecture(config: GPTConfig) -> str:
    """The ``transformers`` architecture that computes what ``GPT(config)`` does; else :class:`NoHFForm`
    naming every setting the nearest one lacks, so that one retrain fixes them all."""
    nearest = min(HF_SHAPES, key=lambda architecture: len(shape_mismatches(config, architecture)))
    mismatches = shape_mismatches(config, nearest)
    if mismatches:
        raise NoHFForm(nearest, mismatches)
    return as_qwen2(config, nearest)


def as_qwen2(config: GPTConfig, architecture: str) -> str:
    """``architecture``, but a Qwen2 for a Llama's shape with biases in the query, key and value projections alone."""
    return "Qwen2ForCausalLM" if architecture == "LlamaForCausalLM" and config.qkv_bias and not config.bias \
        else architecture


def _check_shape(config: GPTConfig, architecture: str) -> None:
    mismatches = shape_mismatches(config, architecture)
    if mismatches:
        raise NoHFForm(architecture, mismatches)


def to_hf_state_dict(state: dict[str, torch.Tensor], config: GPTConfig) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(hf_config_dict, hf_state)`` of the architecture :func:`hf_architecture` picks, which
    ``hf_config_dict["architectures"][0]`` names."""
    if hf_architecture(config) == "GPT2LMHeadModel":
        return to_gpt2_state_dict(state, config)
    return to_llama_state_dict(state, config)  # or a Qwen2, a Qwen3


def has_bias(config: GPTConfig, name: str) -> bool:
    """Whether the layer ``name`` (or its weight, or bias) of ``GPT(config)`` has a bias."""
    return config.bias or (config.qkv_bias and ".attn.qkv" in name)


class _Taker:
    """Takes tensors from our state dict by name, as new CPU tensors, and says which it never took."""

    def __init__(self, state: dict[str, torch.Tensor], config: GPTConfig):
        self.state, self.config, self.taken = state, config, set()
        if config.tie_embeddings:
            self.taken.add("lm_head.weight")  # the same matrix as tok_emb.weight, restored on load

    def __call__(self, name: str, transpose: bool = False) -> torch.Tensor:
        if name not in self.state:
            raise ValueError(f"no {name} in the weights: they are not those of a GPT with this config")
        self.taken.add(name)
        t = self.state[name].detach().cpu()
        return (t.t() if transpose else t).contiguous().clone()

    def head(self) -> dict[str, torch.Tensor]:
        """An untied output head; a tied one is left out, as ``save_pretrained`` does: ``tie_word_embeddings``
        restores it on load."""
        return {} if self.config.tie_embeddings else {"lm_head.weight": self("lm_head.weight")}

    def check_all_taken(self, architecture: str) -> None:
        left = sorted(set(self.state) - self.taken)
        if left:  # a tensor the mapping does not know would be dropped silently
            raise ValueError(f"weights with no {HF_NAMES[architecture]} counterpart: "
                             f"{', '.join(left[:5])}{' ...' if len(left) > 5 else ''}")


def to_gpt2_state_dict(
    state: dict[str, torch.Tensor], config: GPTConfig
) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(hf_config_dict, hf_state)`` for ``GPT2LMHeadModel``, from the state dict of ``GPT(config)``.

    The tensors are new (transposed or cloned), on the CPU, sharing no storage, so
    they can be saved with safetensors.
    """
    _check_shape(config, "GPT2LMHeadModel")
    take = _Taker(state, config)

    def bias(name: str, size: int, like: torch.Tensor) -> torch.Tensor:
        return take(name) if has_bias(config, name) else torch.zeros(size, dtype=like.dtype)

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
        hf |= linear(f"{ours}.mlp.fc", f"{theirs}.mlp.c_fc", c.mlp_width)
        hf |= linear(f"{ours}.mlp.proj", f"{theirs}.mlp.c_proj", c.n_embd)
    hf |= norm("norm_f", "transformer.ln_f") | take.head()
    take.check_all_taken("GPT2LMHeadModel")

    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,  # older transformers versions read the context length from here
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": c.mlp_width,
        # erf GELU, as F.gelu; GPT-2's own is the tanh form, "gelu_new", ours as mlp gelu_tanh
        "activation_function": "gelu_new" if c.mlp == "gelu_tanh" else "gelu",
        "layer_norm_epsilon": c.norm_eps,
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


def to_llama_state_dict(
    state: dict[str, torch.Tensor], config: GPTConfig
) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(hf_config_dict, hf_state)`` for ``LlamaForCausalLM``, from the state dict of ``GPT(config)``: new CPU
    tensors, as :func:`to_gpt2_state_dict` gives. A model with biases in its query, key and value projections
    alone (``qkv_bias`` without ``bias``) is a ``Qwen2ForCausalLM``, one with ``qk_norm`` a ``Qwen3ForCausalLM``,
    which have the same names (Qwen3's two norms besides)."""
    _check_shape(config, "Qwen3ForCausalLM" if config.qk_norm else "LlamaForCausalLM")
    architecture = hf_architecture(config)
    qwen2, qwen3 = architecture == "Qwen2ForCausalLM", architecture == "Qwen3ForCausalLM"
    take = _Taker(state, config)
    c, hidden, kv = config, config.mlp_width, config.kv_heads * config.head_dim

    def rows(name: str, *sizes: int) -> list[torch.Tensor]:
        """The weight or bias ``name`` cut into blocks of rows, a fused projection's parts: each its own copy, as
        safetensors saves no tensors that share memory."""
        return [t.clone() for t in take(name).split(list(sizes))]

    def linear(ours: str, theirs: list[str], *sizes: int) -> dict[str, torch.Tensor]:
        parts = {f"{name}.weight": t for name, t in zip(theirs, rows(f"{ours}.weight", *sizes), strict=True)}
        if has_bias(c, ours):
            parts |= {f"{name}.bias": t for name, t in zip(theirs, rows(f"{ours}.bias", *sizes), strict=True)}
        return parts

    hf = {"model.embed_tokens.weight": take("tok_emb.weight")}
    for i in range(c.n_layer):
        ours, theirs = f"blocks.{i}", f"model.layers.{i}"
        hf[f"{theirs}.input_layernorm.weight"] = take(f"{ours}.norm1.weight")
        hf |= linear(f"{ours}.attn.qkv", [f"{theirs}.self_attn.{x}_proj" for x in "qkv"], c.attn_width, kv, kv)
        if qwen3:
            hf |= {f"{theirs}.self_attn.{x}_norm.weight": take(f"{ours}.attn.{x}_norm.weight") for x in "qk"}
        hf |= linear(f"{ours}.attn.proj", [f"{theirs}.self_attn.o_proj"], c.n_embd)
        hf[f"{theirs}.post_attention_layernorm.weight"] = take(f"{ours}.norm2.weight")
        hf |= linear(f"{ours}.mlp.fc", [f"{theirs}.mlp.gate_proj", f"{theirs}.mlp.up_proj"], hidden, hidden)
        hf |= linear(f"{ours}.mlp.proj", [f"{theirs}.mlp.down_proj"], c.n_embd)
    hf |= {"model.norm.weight": take("norm_f.weight")} | take.head()
    take.check_all_taken(architecture)

    hf_config = {
        "architectures": [architecture],
        "model_type": {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}.get(architecture, "llama"),
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": hidden,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_base,  # transformers versions that keep rope_parameters build them from it
        # on the attention weights, where ours has one too; ours after the embeddings and each residual
        # projection has no place in Llama, which matters only to training further in transformers
        "attention_dropout": c.dropout,
        "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": 0.02,  # as GPT._init_weights
        "bos_token_id": None,  # Llama's defaults (1, 2) name tokens our vocabulary need not have
        "eos_token_id": None,
        "pad_token_id": None,
    }
    if qwen2:
        hf_config["use_sliding_window"] = False  # its query, key and value biases are implied
    elif qwen3:
        hf_config |= {"use_sliding_window": False, "attention_bias": False}
    else:
        hf_config |= {"attention_bias": c.bias, "mlp_bias": c.bias}
    if c.rope_scaling:
        hf_config["rope_scaling"] = {"rope_type": "llama3", "factor": c.rope_scaling, **LLAMA3_SCALING}
    return hf_config, hf


class NoOurForm(ValueError):
    """A ``transformers`` model that our GPT cannot compute; the message names each setting it lacks."""


def from_hf_state_dict(hf_config: dict, hf_state: dict[str, torch.Tensor]) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """``(config, state)`` of our GPT that computes what a ``GPT2LMHeadModel``, ``LlamaForCausalLM``,
    ``MistralForCausalLM``, ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM`` does, from
    its ``config.json`` contents and weights: the inverse of :func:`to_hf_state_dict`. Raises
    :class:`NoOurForm` for other models, and for settings ours does not have."""
    kind = hf_config.get("model_type")
    read = {"gpt2": from_gpt2_state_dict, "llama": from_llama_state_dict, "mistral": from_llama_state_dict,
            "qwen2": from_llama_state_dict, "qwen3": from_llama_state_dict}.get(kind)
    if read is not None:
        try:
            return read(hf_config, hf_state)
        except NoOurForm:
            raise
        except (ValueError, TypeError) as e:  # a size our GPT cannot have (heads that do not divide), a null
            raise NoOurForm(f"config.json: {e}") from None
    raise NoOurForm(f"model_type {kind!r}: the models read are gpt2 (GPT2LMHeadModel), llama (LlamaForCausalLM), "
                    f"mistral (MistralForCausalLM), qwen2 (Qwen2ForCausalLM) and qwen3 (Qwen3ForCausalLM)")


class _HFTaker:
    """Takes tensors from a ``transformers`` state dict by name, as float32 CPU tensors, and says which it never
    took. ``prefixes``: what a name may start with (GPT-2's own files have no ``transformer.``)."""

    def __init__(self, state: dict[str, torch.Tensor], prefixes: tuple[str, ...], ignored: str = r"$^"):
        self.state, self.prefixes, self.taken = state, prefixes, set()
        self.ignored = {name for name in state if re.search(ignored, name)}

    def __call__(self, name: str, transpose: bool = False) -> torch.Tensor:
        found = next((p + name for p in self.prefixes if p + name in self.state), None)
        if found is None:
            raise NoOurForm(f"no {name} in the weights: they are not those of the model its config.json describes")
        self.taken.add(found)
        t = self.state[found].detach().to("cpu", torch.float32)
        return (t.t() if transpose else t).contiguous().clone()

    def has(self, name: str) -> bool:
        return any(p + name in self.state for p in self.prefixes)

    def check_all_taken(self) -> None:
        left = sorted(set(self.state) - self.taken - self.ignored)
        if left:  # a tensor our GPT has no place for would be dropped silently
            raise NoOurForm(f"weights our GPT has no place for: {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}")


def _rotary(c: dict, problems: list[str]) -> tuple[float, dict, bool]:
    """A Llama-like config's rotary base, its scaling (``{}``: none) and whether that is Llama 3.1's, which ours
    computes; what it cannot, or cannot read, goes to ``problems``. transformers 5 keeps them in
    ``rope_parameters``, which it reads first; earlier versions as ``rope_theta`` and ``rope_scaling``."""
    rope = c.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        problems.append(f"rope_parameters {rope!r} (expected a mapping)")
        rope = {}
    base = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    if not isinstance(base, (int, float)) or isinstance(base, bool) or not base > 0:
        problems.append(f"rope_theta {base!r} (expected a number > 0)")
        base = 10000.0
    scaling = next((s for s in (rope, c.get("rope_scaling")) if isinstance(s, dict)
                    and s.get("rope_type", s.get("type", "default")) != "default"), None) or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = scaling.get("factor")
    llama3 = kind == "llama3" and isinstance(factor, (int, float)) and factor >= 1 and \
        all(scaling.get(k) == v for k, v in LLAMA3_SCALING.items())
    if scaling and not llama3:
        problems.append(f"rotary scaling {scaling} (ours: none, or llama3 with a factor >= 1 and {LLAMA3_SCALING})")
    return float(base), scaling, llama3


def _slides(c: dict) -> bool:
    """Whether some layer of a Mistral, Qwen2 or Qwen3 config attends within a sliding window: every layer of a
    Mistral's; a Qwen's from max_window_layers on, when use_sliding_window (or as ``layer_types`` lists them)."""
    if isinstance(c.get("layer_types"), list):
        return "sliding_attention" in c["layer_types"]
    if c.get("model_type") in ("qwen2", "qwen3"):
        return bool(c.get("use_sliding_window")) and c.get("max_window_layers", 28) < c.get("num_hidden_layers", 32)
    return c.get("model_type") == "mistral"


def _refuse(name: str, problems: list[str]) -> None:
    if problems:
        raise NoOurForm(f"{name} with {'; '.join(problems)}: our GPT computes otherwise")


def _head(take: _HFTaker, tied: bool, embedding: torch.Tensor, name: str = "lm_head.weight") -> torch.Tensor:
    """The output head: the embedding when tied (a copy saved beside it is the same matrix), else its own."""
    if tied:
        if take.has(name):
            take(name)  # the same matrix, saved by some versions: taken, and not kept twice
        return embedding
    return take(name)


def from_gpt2_state_dict(c: dict, hf: dict[str, torch.Tensor]) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Our GPT with learned positions, LayerNorm and biases, from a ``GPT2LMHeadModel``'s config and weights."""
    n_embd = c.get("n_embd", 768)
    act = c.get("activation_function", "gelu_new")
    mlp = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(act)
    problems = [] if mlp else [f"activation_function {act!r} (ours: gelu, gelu_new)"]
    if not c.get("scale_attn_weights", True) or c.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("attention scores scaled otherwise than by 1/sqrt(head_dim)")
    _refuse("GPT-2", problems)
    tied = c.get("tie_word_embeddings", True)
    width = c.get("n_inner") or 4 * n_embd  # null: 4 x n_embd, as transformers reads it
    config = GPTConfig(vocab_size=c.get("vocab_size", 50257), block_size=c.get("n_positions", 1024),
                       n_layer=c.get("n_layer", 12), n_head=c.get("n_head", 12), n_embd=n_embd,
                       dropout=c.get("resid_pdrop", 0.1), bias=True, pos_emb="learned", norm="layernorm",
                       mlp=mlp, tie_embeddings=tied, mlp_hidden=0 if width == 4 * n_embd else width,
                       norm_eps=c.get("layer_norm_epsilon", 1e-5))
    # the causal mask GPT-2's attention kept as a buffer in older files: not a weight
    take = _HFTaker(hf, ("transformer.", ""), ignored=r"\.attn\.(masked_)?bias$")

    def linear(theirs: str, ours: str) -> dict[str, torch.Tensor]:
        return {f"{ours}.weight": take(f"{theirs}.weight", transpose=True), f"{ours}.bias": take(f"{theirs}.bias")}

    def norm(theirs: str, ours: str) -> dict[str, torch.Tensor]:
        return {f"{ours}.weight": take(f"{theirs}.weight"), f"{ours}.bias": take(f"{theirs}.bias")}

    state = {"tok_emb.weight": take("wte.weight"), "pos_emb.weight": take("wpe.weight")}
    for i in range(config.n_layer):
        theirs, ours = f"h.{i}", f"blocks.{i}"
        state |= norm(f"{theirs}.ln_1", f"{ours}.norm1") | linear(f"{theirs}.attn.c_attn", f"{ours}.attn.qkv")
        state |= linear(f"{theirs}.attn.c_proj", f"{ours}.attn.proj") | norm(f"{theirs}.ln_2", f"{ours}.norm2")
        state |= linear(f"{theirs}.mlp.c_fc", f"{ours}.mlp.fc") | linear(f"{theirs}.mlp.c_proj", f"{ours}.mlp.proj")
    state |= norm("ln_f", "norm_f")
    take.prefixes = ("",)  # the head sits beside the transformer, never in it
    state["lm_head.weight"] = _head(take, tied, state["tok_emb.weight"])
    take.check_all_taken()
    return config, state


LLAMA_LIKE_DEFAULTS = {
    "llama": {"vocab_size": 32000, "intermediate_size": 11008, "num_key_value_heads": None,
              "max_position_embeddings": 2048, "head_dim": None, "sliding_window": None},
    "mistral": {"vocab_size": 32000, "intermediate_size": 14336, "num_key_value_heads": 8,
                "max_position_embeddings": 131072, "head_dim": None, "sliding_window": 4096},
    "qwen2": {"vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
              "max_position_embeddings": 32768, "head_dim": None, "sliding_window": 4096},
    "qwen3": {"vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
              "max_position_embeddings": 32768, "head_dim": 128, "sliding_window": 4096},
}
"""What a ``config.json`` that leaves these settings out has, as transformers reads it: the defaults of its
LlamaConfig, MistralConfig, Qwen2Config and Qwen3Config, copied (reading them would import transformers). The
settings not here have the same default in all four (4096 wide, 32 heads and layers, rms_norm_eps 1e-6,
rope_theta 10000); a null num_key_value_heads or head_dim is worked out from the heads, and a Qwen's sliding
window is used only with use_sliding_window."""


def from_llama_state_dict(c: dict, hf: dict[str, torch.Tensor]) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Our GPT with rotary positions, RMSNorm and SwiGLU, from the config and weights of a ``LlamaForCausalLM``,
    or of a ``MistralForCausalLM``, ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM``, which have the same names (Qwen3's
    query and key norms besides): one with heads of any width (``head_dim``), no rotary scaling but Llama
    3.1's, and biases in all of the attention and the MLP, in neither, or (Qwen2) in the query, key and value
    projections alone.

    A sliding window (Mistral's, that of a Qwen's later layers) is a full causal attention over any context no
    longer than it: the model gets the window as its context (block_size) when that is shorter than
    max_position_embeddings."""
    kind = c.get("model_type")
    c = LLAMA_LIKE_DEFAULTS[kind] | c  # a Mistral's or a Qwen's defaults are not a Llama's
    hidden, heads = c.get("hidden_size", 4096), c.get("num_attention_heads", 32)
    kv_heads = c["num_key_value_heads"] or heads  # null: as many as heads, as transformers reads it
    width = c["intermediate_size"]
    problems = []
    if c.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {c['hidden_act']!r} (ours: silu)")
    base, scaling, llama3 = _rotary(c, problems)
    head_dim = c["head_dim"] or hidden // heads
    if kind == "qwen3" and c.get("attention_bias"):  # in o_proj too, with none in the MLP
        problems.append("attention_bias true (ours: none in a Qwen3)")
    elif kind not in ("qwen2", "qwen3") and bool(c.get("attention_bias", False)) != bool(c.get("mlp_bias", False)):
        problems.append("biases in the attention or the MLP alone (ours: both or neither)")
    context = c["max_position_embeddings"]
    if c.get("sliding_window") and _slides(c):  # within the window, a full causal attention
        context = min(context, c["sliding_window"])
    _refuse(HF_NAMES[f"{kind.capitalize()}ForCausalLM"], problems)
    tied = c.get("tie_word_embeddings", False)
    qkv_bias = kind == "qwen2"  # which has no other biases, whatever attention_bias or mlp_bias say
    bias = not qkv_bias and bool(c.get("attention_bias", False))
    qk_norm = kind == "qwen3"
    # the settings at their defaults are left 0, as a model trained here has them
    config = GPTConfig(vocab_size=c["vocab_size"], block_size=context,
                       n_layer=c.get("num_hidden_layers", 32), n_head=heads, n_embd=hidden,
                       dropout=c.get("attention_dropout", 0.0), bias=bias, pos_emb="rope", norm="rmsnorm",
                       mlp="swiglu", tie_embeddings=tied, n_kv_head=0 if kv_heads == heads else kv_heads,
                       mlp_hidden=0 if width == swiglu_hidden(hidden) else width, rope_base=base,
                       rope_scaling=float(scaling["factor"]) if llama3 else 0.0,
                       norm_eps=c.get("rms_norm_eps", 1e-6), qkv_bias=qkv_bias, qk_norm=qk_norm,
                       head_size=head_dim)  # 0 where it is hidden / heads: GPTConfig has one form of each
    take = _HFTaker(hf, ("",), ignored=r"rotary_emb\.inv_freq$")  # a buffer older versions saved

    def joined(theirs: list[str], ours: str) -> dict[str, torch.Tensor]:
        parts = {f"{ours}.weight": torch.cat([take(f"{name}.weight") for name in theirs])}
        if bias or (qkv_bias and ours.endswith(".qkv")):
            parts[f"{ours}.bias"] = torch.cat([take(f"{name}.bias") for name in theirs])
        return parts

    state = {"tok_emb.weight": take("model.embed_tokens.weight")}
    for i in range(config.n_layer):
        theirs, ours = f"model.layers.{i}", f"blocks.{i}"
        state[f"{ours}.norm1.weight"] = take(f"{theirs}.input_layernorm.weight")
        state |= joined([f"{theirs}.self_attn.{x}_proj" for x in "qkv"], f"{ours}.attn.qkv")
        if qk_norm:
            state |= {f"{ours}.attn.{x}_norm.weight": take(f"{theirs}.self_attn.{x}_norm.weight") for x in "qk"}
        state |= joined([f"{theirs}.self_attn.o_proj"], f"{ours}.attn.proj")
        state[f"{ours}.norm2.weight"] = take(f"{theirs}.post_attention_layernorm.weight")
        state |= joined([f"{theirs}.mlp.gate_proj", f"{theirs}.mlp.up_proj"], f"{ours}.mlp.fc")
        state |= joined([f"{theirs}.mlp.down_proj"], f"{ours}.mlp.proj")
    state["norm_f.weight"] = take("model.norm.weight")
    state["lm_head.weight"] = _head(take, tied, state["tok_emb.weight"])
    take.check_all_taken()
    return config, state
