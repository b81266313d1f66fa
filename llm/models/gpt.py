"""GPT: a decoder-only transformer language model, usable without the training code.

Pre-norm blocks of causal self-attention (``scaled_dot_product_attention``,
with as many key-value heads as heads or fewer: grouped-query attention) and an
MLP, with rotary or learned positions, RMSNorm or LayerNorm, SwiGLU or GELU.

Each :class:`Block` takes and returns the residual stream ``x`` (the rotary
tables live inside the attention, one pair that all blocks share), so the
engine can wrap blocks one by one for FSDP, ``torch.compile`` or activation
checkpointing. Generation passes a :class:`KVCache` as well, so that each new
token reads only its own position.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_CHOICES = {"pos_emb": ("rope", "learned"), "norm": ("rmsnorm", "layernorm"), "mlp": ("swiglu", "gelu", "gelu_tanh")}


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = False
    pos_emb: str = "rope"
    norm: str = "rmsnorm"
    mlp: str = "swiglu"
    tie_embeddings: bool = True
    n_kv_head: int = 0
    """Key-value heads, each shared by n_head / n_kv_head query heads (0: as many as n_head)."""
    mlp_hidden: int = 0
    """The MLP's hidden width (0: :func:`swiglu_hidden` for SwiGLU, 4 * n_embd for GELU)."""
    rope_base: float = 10000.0
    rope_scaling: float = 0.0
    """Llama 3.1's rotary scaling by this factor (see :func:`llama3_scaled`; 0: none)."""
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    """Biases in the query, key and value projections, whatever ``bias`` says (Qwen2 has them alone)."""
    qk_norm: bool = False
    """Each head's query and key normalised (``norm``, over head_dim) before the rotary positions, as Qwen3 has them."""
    head_size: int = 0
    """Each attention head's width (0: n_embd // n_head, the usual); :attr:`head_dim` is the one in use."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_kv_head", "mlp_hidden", "head_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"GPTConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.head_size * self.n_head == self.n_embd:  # the usual width, given: one form of each model
            self.head_size = 0
        if self.n_kv_head == self.n_head:  # and the usual count of key-value heads
            self.n_kv_head = 0
        for name in ("rope_base", "norm_eps"):
            if not getattr(self, name) > 0:  # NaN too
                raise ValueError(f"GPTConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.rope_scaling and not self.rope_scaling >= 1:
            raise ValueError(f"GPTConfig.rope_scaling must be 0 (none) or >= 1, got {self.rope_scaling}")
        if self.n_embd % self.n_head and not self.head_size:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise ValueError(f"GPTConfig.n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head size, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def attn_width(self) -> int:
        """The queries' width, all heads together: n_embd unless ``head_size`` says otherwise."""
        return self.n_head * self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def mlp_width(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        return swiglu_hidden(self.n_embd) if self.mlp == "swiglu" else 4 * self.n_embd

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown GPTConfig fields: {', '.join(sorted(unknown))}")
        return cls(**data)


def swiglu_hidden(n_embd: int, multiple_of: int = 64) -> int:
    """SwiGLU width: 8/3 * n_embd (same parameters as a 4x GELU MLP), rounded up to ``multiple_of``."""
    return multiple_of * math.ceil(8 * n_embd / 3 / multiple_of)


def make_norm(config: GPTConfig, width: int = 0) -> nn.Module:
    """The normalisation ``config.norm`` names, over ``width`` features (0: n_embd)."""
    width = width or config.n_embd
    if config.norm == "rmsnorm":
        return nn.RMSNorm(width, eps=config.norm_eps)  # has no bias by definition
    return nn.LayerNorm(width, eps=config.norm_eps, bias=config.bias)


def make_rotary(config: GPTConfig) -> Rotary | None:
    """The rotary tables ``config`` asks for, or None for learned positions."""
    if config.pos_emb != "rope":
        return None
    return Rotary(config.head_dim, config.block_size, config.rope_base, config.rope_scaling)


class Rotary(nn.Module):
    """Rotary position embedding (RoPE), "rotate half" layout, for tensors shaped (B, T, H, D).

    Queries and keys are rotated as the qkv projection lays them out, before the
    transpose to (B, H, T, D): then all three reach the attention kernel as views
    of one layout, which on a GPU ran the rotary GPT-2 124M step 9% faster than
    rotating after the transpose (BENCHMARKS.md, GPU MFU).
    """

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0, scaling: float = 0.0):
        super().__init__()
        # 1 / base^(2i/d), computed as Llama's does: base^(-2i/d) rounds a third of the frequencies otherwise, and
        # their angles part ways with position (logits 1e-2 apart at position 4000)
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        if scaling:
            inv_freq = llama3_scaled(inv_freq, scaling)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, D/2)
        # not persistent: derived from the config, so checkpoints need not carry them
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Rotate ``x``, whose positions are ``start``, ``start + 1``, ..."""
        t = x.size(1)
        cos, sin = (table[start:start + t, None].to(x.dtype) for table in (self.cos, self.sin))
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def llama3_scaled(inv_freq: torch.Tensor, factor: float, low: float = 1.0, high: float = 4.0,
                  context: int = 8192) -> torch.Tensor:
    """Rotary frequencies as Llama 3.1 and 3.2 stretch them past the ``context`` they were first trained on.

    A wavelength (2 pi / frequency) shorter than context / high is kept; one longer than context / low is
    stretched ``factor`` times, so that it spans the longer context as it spanned the first one; in between,
    a frequency moves from kept to stretched linearly in context / wavelength. ``low``, ``high`` and ``context``
    are Meta's, the same in every Llama 3 that scales (1, 4, 8192); ``factor`` is 8 in 3.1 and 32 in 3.2.
    """
    # in the order Llama's own code computes it, so that every frequency rounds alike
    kept = ((context / (2 * math.pi / inv_freq) - low) / (high - low)).clamp(0.0, 1.0)  # 1: kept, 0: stretched
    return (1 - kept) * inv_freq / factor + kept * inv_freq


class LayerCache:
    """One block's keys and values of the positions read so far, for up to ``capacity`` (block_size) positions.

    The buffers double as they fill, from 256 positions: a model with a long context (a Llama's 131072
    positions, gigabytes of keys and values) costs what the text generated so far needs.
    """

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the keys and values (B, H, T, D) of T new positions; all of them so far."""
        end = self.length + k.size(2)
        if end > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions, {end} were asked for")
        if self.k is None or end > self.k.size(2):
            room = min(self.capacity, max(256, end, 2 * (0 if self.k is None else self.k.size(2))))
            shape = (*k.shape[:2], room, k.shape[3])
            grown_k, grown_v = k.new_empty(shape), v.new_empty(shape)
            if self.k is not None:
                grown_k[:, :, :self.length], grown_v[:, :, :self.length] = self.k[:, :, :self.length], \
                    self.v[:, :, :self.length]
            self.k, self.v = grown_k, grown_v
        self.k[:, :, self.length:end], self.v[:, :, self.length:end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """The keys and values of every block for the positions a model has read, so that generating a token
    costs one position's work, not the whole context's. For inference: no gradients flow through it."""

    def __init__(self, config: GPTConfig):
        self.layers = [LayerCache(config.block_size) for _ in range(config.n_layer)]

    @property
    def length(self) -> int:
        """Positions read so far."""
        return self.layers[0].length


class CausalSelfAttention(nn.Module):
    """Queries of n_head heads; keys and values of n_kv_head, each read by n_head / n_kv_head queries (grouped-query
    attention: a smaller KV cache), laid out in ``qkv`` as the queries' rows, the keys', the values'. With
    ``qk_norm`` each head's query and key is normalised first (one norm for all query heads, one for all key
    heads), which keeps the attention logits in range as training goes on."""

    def __init__(self, config: GPTConfig, rope: Rotary | None = None):
        super().__init__()
        self.dropout = config.dropout
        self.sizes = [config.attn_width] + [config.kv_heads * config.head_dim] * 2
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.n_embd, sum(self.sizes), bias=config.bias or config.qkv_bias)
        self.proj = nn.Linear(config.attn_width, config.n_embd, bias=config.bias)
        self.rope = rope if rope is not None else make_rotary(config)
        self.q_norm = make_norm(config, config.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, config.head_dim) if config.qk_norm else None
        self.resid_dropout = nn.Dropout(config.dropout)
        self.grouped = config.kv_heads != config.n_head

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in self.qkv(x).split(self.sizes, dim=2))
        start = 0 if cache is None else cache.length
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q, start), self.rope(k, start)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask, causal = None, True
        if cache is not None:
            k, v = cache.extend(k, v)
            if start > 0:  # the new positions see all the cached ones, and each other causally
                causal = False
                if T > 1:  # one new position needs no mask at all, which keeps the fastest kernels
                    mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal,
            enable_gqa=self.grouped,
        )
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, self.sizes[0])))


class MLP(nn.Module):
    """SwiGLU (gate and up projections fused into one matmul) or a GELU MLP (erf GELU, or GPT-2's tanh one), of
    ``config.mlp_width`` hidden units."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        self.approximate = "tanh" if config.mlp == "gelu_tanh" else "none"
        hidden = config.mlp_width
        self.fc = nn.Linear(config.n_embd, 2 * hidden if self.swiglu else hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate=self.approximate)
        return self.dropout(self.proj(h))


class Block(nn.Module):
    """One pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``; ``rope``: rotary tables
    to share with other blocks (built for this one if not given)."""

    def __init__(self, config: GPTConfig, rope: Rotary | None = None):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config, rope)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == "learned" else None
        self.dropout = nn.Dropout(config.dropout)
        # one pair of rotary tables for all blocks: for Llama 3.1's 131072 positions a pair is 64 MiB
        rope = make_rotary(config)
        self.blocks = nn.ModuleList(Block(config, rope) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: each block adds two projections to the residual stream, so scale
        # their init by 1/sqrt(2 * n_layer) to keep its variance flat with depth
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @classmethod
    def from_weights(cls, config: GPTConfig, state: dict[str, Any],
                     load: Callable[[GPT, dict[str, Any]], None]) -> GPT:
        """A GPT holding the weights ``state``, in float32, put in by ``load(model, state)``: a
        ``load_state_dict(state, assign=True)``. Built on the meta device, so that no random weights are made
        only to be written over: for a model of billions of parameters, minutes, and a second copy of it in
        memory."""
        # float32 and contiguous, as the parameters of a model built to take them would copy them (a bfloat16
        # import's, a transposed view)
        state = {key: value.float().contiguous() if isinstance(value, torch.Tensor) and value.is_floating_point()
                 else value for key, value in state.items()}
        with torch.device("meta"):
            model = cls(config)
        load(model, state)
        if config.tie_embeddings:  # assign gave the head and the embedding a tensor each: one again, as built
            model.tok_emb.weight = model.lm_head.weight
        rope = make_rotary(config)  # derived from the config, in no checkpoint: made now, on the CPU
        for module in model.modules():
            if isinstance(module, Rotary):
                module.cos, module.sin = rope.cos, rope.sin
        return model

    def fit_weights(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Another GPT's weights, to start from, fitted to this one: a longer table of learned positions cut to
        this context (GPT-2's 1024 rows for a fine-tune at 256, as the first 256 are what it learned there)."""
        table = state.get("pos_emb.weight")
        if self.pos_emb is not None and isinstance(table, torch.Tensor) and table.dim() == 2 \
                and table.shape[0] > self.config.block_size and table.shape[1] == self.config.n_embd:
            state = {**state, "pos_emb.weight": table[: self.config.block_size]}
        return state

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits for the positions of ``idx``; with ``cache``, they follow the positions it holds, and their
        keys and values are added to it. ``last_only``: the last position's alone, (B, 1, vocab), all that
        sampling reads (the head over a 32k-token prompt of a 128k vocabulary is 16 GB of float32 logits)."""
        start = 0 if cache is None else cache.length
        T = idx.size(1)
        if start + T > self.config.block_size:
            raise ValueError(f"sequence length {start + T} exceeds the model's block_size {self.config.block_size}")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            x = block(x) if cache is None else block(x, cache.layers[i])
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm_f(x))

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, each counted once (a tied head and embedding are one matrix).

        ``non_embedding`` leaves out the lookup tables: learned positions, and the
        token embedding unless it is tied to the output head (then it is a matmul).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.tok_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token at context ``seq_len`` (default block_size).

        ``6 * N + 12 * n_layer * n_head * head_dim * seq_len`` (PaLM, appendix B): N = num_params()
        costs 2 FLOPs per weight forward and 4 backward; attention scores and the
        weighted sum of values cost 2 * 2 * n_head * head_dim * seq_len forward per layer, x3 with
        backward. The causal mask's saving (about half of the attention term) is not
        subtracted, as is usual when reporting MFU.
        """
        c = self.config
        seq_len = c.block_size if seq_len is None else seq_len
        return 6 * self.num_params() + 12 * c.n_layer * c.attn_width * seq_len

    @torch.no_grad()
    def generate_stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        top_p: float | None = None,
        vocab: int | None = None,
    ) -> Iterator[int]:
        """Yield ``max_new_tokens`` sampled token ids, one at a time, continuing ``idx``.

        ``idx`` is one prompt of ids, shaped (T,) or (1, T); the context is cropped
        to the last block_size tokens. ``temperature=0`` picks the most likely token;
        ``top_k`` samples among the k most likely; ``top_p`` among the fewest most
        likely tokens whose probabilities add up to at least p (nucleus sampling),
        after temperature and top_k; ``generator`` (on the model's device) makes
        sampling reproducible; ``vocab`` keeps to the ids below it (the tokenizer's
        size, when the model's vocabulary is padded past it). A :class:`KVCache`
        keeps each block's keys and values, so a token costs one position's work
        until the context fills the block; past that the window slides, every
        position moves, and each token reads the last block_size tokens again. Call
        ``model.eval()`` first to turn dropout off.
        """
        if not 0 <= temperature < math.inf:  # NaN too
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if vocab is not None and not 1 <= vocab <= self.config.vocab_size:
            raise ValueError(f"vocab must be from 1 to the model's {self.config.vocab_size}, got {vocab}")
        if idx.dim() == 1:
            idx = idx.unsqueeze(0)
        if idx.dim() != 2 or idx.size(0) != 1 or idx.size(1) == 0:
            raise ValueError(f"generate_stream takes one non-empty prompt, (T,) or (1, T), got {tuple(idx.shape)}")
        block_size = self.config.block_size
        cache, unread = KVCache(self.config), idx[:, -block_size:]
        for _ in range(max_new_tokens):
            if cache.length + unread.size(1) <= block_size:
                logits = self(unread, cache, last_only=True)[:, -1, :].float()
            else:
                logits = self(idx[:, -block_size:], last_only=True)[:, -1, :].float()
            logits = logits[:, :vocab]  # ids past a padded vocabulary's tokens are never sampled
            # logits that are not numbers (NaN, or overflowed to inf) are sampled from as zeros, which cannot fail
            # on the device, and the token drawn is marked -1: the read of the token tells the host at no cost
            finite = torch.isfinite(logits).all()
            logits = torch.where(finite, logits, 0.0)
            if temperature < torch.finfo(logits.dtype).tiny:  # 0, or so small that float32 rounds it to 0
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                # the largest logit subtracted first: a tiny temperature then gives -inf, not inf - inf = nan
                logits = logits - logits.max(dim=-1, keepdim=True).values
                if top_k is not None:  # chosen before the temperature, whose division can round every logit to 0
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = (logits / temperature).masked_fill(logits < kth, float("-inf"))
                else:
                    logits = logits / temperature
                if top_p is not None and top_p < 1:
                    logits = _nucleus(logits, top_p)
                next_id = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            next_id = torch.where(finite, next_id, -1)
            token = int(next_id)  # a device-to-host sync per token: the caller consumes it now
            if token < 0:
                raise FloatingPointError(f"the model's logits for token {idx.size(1)} are not numbers (NaN, or "
                                         f"overflowed to inf)")
            idx, unread = torch.cat([idx, next_id], dim=1), next_id
            yield token


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logits`` with -inf for every token outside the fewest most likely ones whose probabilities add up to
    at least ``top_p``; the most likely token always stays."""
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = F.softmax(ordered, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # the probability of the more likely tokens
    # before > 0: a top_p float32 rounds to 0 (below 1.4e-45) would otherwise mask every token
    ordered = ordered.masked_fill((before >= top_p) & (before > 0), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
