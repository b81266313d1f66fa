import pytest
import torch

from llm.models.gpt import GPT, GPTConfig, swiglu_hidden
from llm.models.hf import (
    NoHFForm,
    from_hf_state_dict,
    hf_architecture,
    to_gpt2_state_dict,
    to_hf_state_dict,
    to_llama_state_dict,
)

GPT2_SHAPED = {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu"}


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.1, **GPT2_SHAPED | kw)
    model = GPT(config).eval()
    with torch.no_grad():
        # the init's small weights leave every activation near 0, where the GELU variants
        # agree; unit-scale activations (as after training) and non-trivial biases and
        # norms let a wrong mapping show in the logits
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, p.size(1) ** -0.5)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def as_hf(model: GPT, **config_changes):
    """The transformers model to_hf_state_dict describes, with its weights loaded: GPT-2, Llama,
    Qwen2 or Qwen3."""
    transformers = pytest.importorskip("transformers")
    hf_config, hf_state = to_hf_state_dict(model.state_dict(), model.config)
    config = transformers.AutoConfig.for_model(**hf_config | config_changes)
    hf = getattr(transformers, hf_config["architectures"][0])(config)
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    tied = ["lm_head.weight"] if model.config.tie_embeddings else []
    assert (missing, unexpected) == (tied, [])
    if tied:
        assert hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    return hf.eval()


NOT_OUR_DEFAULTS = {"mlp_hidden": 40, "norm_eps": 1e-6}  # another MLP width and epsilon, as released models have


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("other", [{}, NOT_OUR_DEFAULTS])
def test_gpt2_computes_the_same_logits(bias, tie, other):
    model = tiny(bias=bias, tie_embeddings=tie, **other)
    hf = as_hf(model)
    idx = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), rtol=0, atol=1e-5)
        torch.testing.assert_close(hf(idx[:, :5]).logits, model(idx[:, :5]), rtol=0, atol=1e-5)


def test_the_comparison_tells_gelu_from_its_tanh_approximation():
    # GPT-2's own "gelu_new" (tanh) is within ~5e-4 of F.gelu (erf): the comparison must see that
    model = tiny(bias=True)
    hf = as_hf(model, activation_function="gelu_new")
    idx = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max() > 1e-4


def test_without_biases_gpt2_gets_zero_biases_and_conv1d_weights():
    model = tiny(bias=False)
    hf_config, hf_state = to_gpt2_state_dict(model.state_dict(), model.config)
    biases = {name: t for name, t in hf_state.items() if name.endswith(".bias")}
    assert len(biases) == 2 * 2 + 2 * 4 + 1  # per block: 2 LayerNorms and 4 projections; then ln_f
    assert all(torch.equal(t, torch.zeros_like(t)) for t in biases.values())
    # Conv1D is (in, out): the transpose of nn.Linear; c_attn keeps q, k, v in our order
    qkv = model.blocks[0].attn.qkv.weight
    assert torch.equal(hf_state["transformer.h.0.attn.c_attn.weight"], qkv.t())
    assert hf_state["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)
    assert "lm_head.weight" not in hf_state  # tied: the embedding, restored on load
    assert hf_config["activation_function"] == "gelu" and hf_config["n_positions"] == 16
    assert hf_config["resid_pdrop"] == hf_config["embd_pdrop"] == hf_config["attn_pdrop"] == 0.1


@pytest.mark.parametrize("field, value, needed", [
    ("pos_emb", "rope", "learned"), ("norm", "rmsnorm", "layernorm"), ("mlp", "swiglu", "gelu"),
])
def test_shapes_gpt2_lacks_are_refused_by_name(field, value, needed):
    model = tiny(**{field: value})
    with pytest.raises(NoHFForm) as e:
        to_gpt2_state_dict(model.state_dict(), model.config)
    assert e.value.mismatches == [(field, value, needed)] and e.value.architecture == "GPT2LMHeadModel"


def test_every_shape_gpt2_lacks_is_named_at_once():
    # one retrain, not one per setting: the refusal lists them all
    model = tiny(pos_emb="rope", norm="rmsnorm", mlp="swiglu")
    with pytest.raises(NoHFForm) as e:
        to_gpt2_state_dict(model.state_dict(), model.config)
    assert e.value.mismatches == [("pos_emb", "rope", "learned"), ("norm", "rmsnorm", "layernorm"),
                                  ("mlp", "swiglu", "gelu")]


def test_weights_that_do_not_fit_the_config_are_refused():
    model = tiny(bias=True)
    state = model.state_dict()
    with pytest.raises(ValueError, match="no blocks.1.mlp.fc.bias"):
        to_gpt2_state_dict({k: v for k, v in state.items() if k != "blocks.1.mlp.fc.bias"}, model.config)
    with pytest.raises(ValueError, match="no GPT-2 counterpart: extra"):
        to_gpt2_state_dict(state | {"extra": torch.zeros(1)}, model.config)


LLAMA_SHAPED = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu"}  # the defaults


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("other", [{}, {"n_kv_head": 2, "rope_base": 500000.0, **NOT_OUR_DEFAULTS},
                                   {"n_kv_head": 1, "qkv_bias": True}, {"head_size": 12, "n_kv_head": 2}])
def test_llama_computes_the_same_logits(bias, tie, other):
    """With biases in the query, key and value projections alone, a Qwen2."""
    model = tiny(bias=bias, tie_embeddings=tie, **LLAMA_SHAPED, **other)
    hf = as_hf(model)
    idx = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), rtol=0, atol=1e-5)
        torch.testing.assert_close(hf(idx[:, :5]).logits, model(idx[:, :5]), rtol=0, atol=1e-5)
        # and with its own key-value cache, one token at a time, as its generate() reads them
        generated = hf.generate(idx[:1, :4], max_new_tokens=10, do_sample=False)[0, 4:].tolist()
    assert generated == list(model.generate_stream(idx[0, :4], 10, temperature=0))


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("other", [{}, {"n_kv_head": 2, "rope_base": 1e6, "head_size": 16, **NOT_OUR_DEFAULTS}])
def test_queries_and_keys_normed_per_head_are_a_qwen3_that_computes_the_same_logits(tie, other):
    model = tiny(qk_norm=True, tie_embeddings=tie, **LLAMA_SHAPED, **other)
    ours = {name: t.clone() for name, t in model.state_dict().items()}
    hf_config, hf_state = to_hf_state_dict(ours, model.config)
    assert hf_config["architectures"] == ["Qwen3ForCausalLM"] and hf_config["head_dim"] == other.get("head_size", 8)
    assert torch.equal(hf_state["model.layers.1.self_attn.k_norm.weight"], ours["blocks.1.attn.k_norm.weight"])
    config, state = from_hf_state_dict(hf_config, hf_state)  # and back: the same model
    assert config == model.config and state.keys() == ours.keys()
    assert all(torch.equal(state[name], t) for name, t in ours.items())
    hf = as_hf(model)
    idx = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), rtol=0, atol=1e-5)
        generated = hf.generate(idx[:1, :4], max_new_tokens=10, do_sample=False)[0, 4:].tolist()
        assert generated == list(model.generate_stream(idx[0, :4], 10, temperature=0))  # through the cache
        for block in model.blocks:  # the norms matter: without them the logits are others
            block.attn.q_norm = block.attn.k_norm = torch.nn.Identity()
        assert (hf(idx).logits - model(idx)).abs().max() > 1e-3


def test_the_llama_comparison_tells_the_rotary_layouts_apart():
    # rotating adjacent pairs (GPT-J's layout) instead of the two halves is a mapping a test must catch
    model = tiny(**LLAMA_SHAPED)
    hf = as_hf(model)
    for layer in range(model.config.n_layer):  # q and k rows reordered: pairs become halves
        attention = hf.model.layers[layer].self_attn
        for projection in (attention.q_proj, attention.k_proj):
            w = projection.weight.data.view(4, 2, 4, -1)  # (heads, half, pair, in)
            projection.weight.data = w.transpose(1, 2).reshape(32, -1).clone()
    idx = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max() > 1e-3


def test_llama_gets_the_fused_projections_cut_into_their_parts():
    model = tiny(bias=True, **LLAMA_SHAPED)
    hf_config, hf_state = to_llama_state_dict(model.state_dict(), model.config)
    qkv, fc = model.blocks[1].attn.qkv, model.blocks[1].mlp.fc
    hidden = hf_config["intermediate_size"]
    assert hidden == fc.out_features // 2 == 128  # 8/3 * 32, rounded up to 64
    assert torch.equal(hf_state["model.layers.1.self_attn.k_proj.weight"], qkv.weight[32:64])
    assert torch.equal(hf_state["model.layers.1.self_attn.v_proj.bias"], qkv.bias[64:])
    assert torch.equal(hf_state["model.layers.1.mlp.up_proj.weight"], fc.weight[hidden:])
    assert hf_config["attention_bias"] and hf_config["mlp_bias"] and hf_config["num_key_value_heads"] == 4
    # each its own memory: safetensors refuses tensors that share it
    pointers = [t.untyped_storage().data_ptr() for t in hf_state.values()]
    assert len(set(pointers)) == len(pointers)


@pytest.mark.parametrize("shape, architecture", [(GPT2_SHAPED, "GPT2LMHeadModel"), (LLAMA_SHAPED, "LlamaForCausalLM")])
def test_each_shape_gets_the_architecture_that_has_it(shape, architecture):
    model = tiny(**shape)
    hf_config, _ = to_hf_state_dict(model.state_dict(), model.config)
    assert hf_architecture(model.config) == hf_config["architectures"][0] == architecture


@pytest.mark.parametrize("mix, nearest, mismatches", [
    ({"pos_emb": "rope", "norm": "layernorm", "mlp": "swiglu"}, "LlamaForCausalLM", [("norm", "layernorm", "rmsnorm")]),
    ({"pos_emb": "rope", "norm": "layernorm", "mlp": "gelu"}, "GPT2LMHeadModel", [("pos_emb", "rope", "learned")]),
    ({**GPT2_SHAPED, "qk_norm": True}, "GPT2LMHeadModel", [("qk_norm", True, False)]),
    ({**GPT2_SHAPED, "qk_norm": True, "bias": True}, "GPT2LMHeadModel", [("qk_norm", True, False)]),
    ({**GPT2_SHAPED, "head_size": 12}, "GPT2LMHeadModel", [("head_size", 12, 0)]),
    # a Llama's biases, or a Qwen3's norms (whose biases it has not): either retrain exports
    ({**LLAMA_SHAPED, "qk_norm": True, "bias": True}, "LlamaForCausalLM", [("qk_norm", True, False)]),
])
def test_a_mix_of_no_architecture_is_refused_against_the_nearest(mix, nearest, mismatches):
    model = tiny(**mix)
    with pytest.raises(NoHFForm) as e:
        to_hf_state_dict(model.state_dict(), model.config)
    assert (e.value.architecture, e.value.mismatches) == (nearest, mismatches)


def test_grouped_query_attention_has_no_gpt2_form():
    model = tiny(n_kv_head=2)
    with pytest.raises(NoHFForm) as e:
        to_gpt2_state_dict(model.state_dict(), model.config)
    assert e.value.mismatches == [("n_kv_head", 2, "0 or 4")]
    assert "GPT-2 has no n_kv_head=2: it needs n_kv_head='0 or 4'" in str(e.value)


@pytest.mark.parametrize("shape", [GPT2_SHAPED, LLAMA_SHAPED])
@pytest.mark.parametrize("other", [{}, NOT_OUR_DEFAULTS | {"rope_base": 1e6}])
def test_a_model_exported_and_read_back_is_the_same_model(shape, other):
    """The settings at their defaults come back as 0, as they were: a resume or fine-tune sees no change."""
    if shape is GPT2_SHAPED:
        other = {k: v for k, v in other.items() if k != "rope_base"}  # learned positions have no rotary base
    else:
        other = other | {"n_kv_head": 2} if other else other
    model = tiny(**shape, **other, bias=True)  # GPT-2 has biases always: a model without gets zero ones
    config, state = from_hf_state_dict(*to_hf_state_dict(model.state_dict(), model.config))
    assert config == model.config
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[name], t) for name, t in model.state_dict().items())


def test_biases_in_the_query_key_and_value_alone_are_a_qwen2():
    model = tiny(qkv_bias=True, **LLAMA_SHAPED)
    hf_config, hf_state = to_hf_state_dict(model.state_dict(), model.config)
    assert hf_config["architectures"] == ["Qwen2ForCausalLM"] and "attention_bias" not in hf_config
    assert sorted(name for name in hf_state if name.startswith("model.layers.0.") and name.endswith("bias")) == \
        [f"model.layers.0.self_attn.{x}_proj.bias" for x in "kqv"]
    assert type(as_hf(model)).__name__ == "Qwen2ForCausalLM"
    model = tiny(qkv_bias=True, bias=True, **LLAMA_SHAPED)  # every bias: a Llama's attention_bias and mlp_bias
    assert hf_architecture(model.config) == "LlamaForCausalLM"


@pytest.mark.parametrize("scaling", [None, 8.0, 32.0])
def test_the_rotary_tables_are_transformers_own_to_the_bit(scaling):
    """Angles grow with position: frequencies one rounding apart put logits 1e-2 apart by position 4000."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from llm.models.gpt import Rotary

    rope = {"rope_scaling": {"rope_type": "llama3", "factor": scaling, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}} if scaling else {}
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_theta=500000.0, **rope)
    init = ROPE_INIT_FUNCTIONS["llama3"] if scaling else LlamaRotaryEmbedding.compute_default_rope_parameters
    theirs, _ = init(config, device="cpu")
    ours = Rotary(64, 8192, 500000.0, scaling or 0.0)
    angles = torch.outer(torch.arange(8192, dtype=torch.float32), theirs)
    assert torch.equal(ours.cos, angles.cos()) and torch.equal(ours.sin, angles.sin())


def test_a_llama_with_llama3_rotary_scaling_computes_the_same_logits_and_without_it_would_not():
    # base 10000, head size 8: the longest wavelength, 6283 positions, is one llama3 stretches in part
    model = tiny(rope_scaling=32.0, **LLAMA_SHAPED)
    hf = as_hf(model)
    assert hf.config.to_dict().get("rope_parameters", hf.config.to_dict().get("rope_scaling"))["rope_type"] == "llama3"
    idx = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    unscaled = tiny(**LLAMA_SHAPED)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), rtol=0, atol=1e-5)
        assert (hf(idx).logits - unscaled(idx)).abs().max() > 1e-4


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_what_a_config_json_leaves_out_is_read_as_transformers_reads_it_for_its_model_type(model_type):
    transformers = pytest.importorskip("transformers")
    given = {"model_type": model_type, "hidden_size": 64, "num_hidden_layers": 1}  # no vocabulary, heads nor context
    theirs = transformers.AutoConfig.for_model(**given)
    with torch.device("meta"):  # the shapes alone: a Qwen's default vocabulary is large
        shapes = transformers.AutoModelForCausalLM.from_config(theirs).state_dict()
    ours, _ = from_hf_state_dict(given, {name: torch.zeros(t.shape) for name, t in shapes.items()})
    window = getattr(theirs, "sliding_window", None)  # a Mistral's, on every layer; a Qwen's, unless use_sliding_window
    assert ours.vocab_size == theirs.vocab_size
    assert ours.block_size == min(theirs.max_position_embeddings, window or theirs.max_position_embeddings)
    assert (ours.n_kv_head or ours.n_head) == theirs.num_key_value_heads
    head_dim = getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads  # Qwen2: none
    assert (ours.head_size or ours.n_embd // ours.n_head) == head_dim
    assert (ours.mlp_hidden or swiglu_hidden(ours.n_embd)) == theirs.intermediate_size
