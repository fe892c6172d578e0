"""Fusion's compact decoder, readable top to bottom.

RMSNorm, rotary positions, grouped-query attention through `scaled_dot_product_attention`, and
a SwiGLU MLP: the block of Llama, Mistral and Qwen2/3, whose few differences (q/k/v biases, a
per-head q/k norm, stretched rotary frequencies, tied embeddings) are config fields. The shape comes from `shared.shapes.ModelConfig`, where each layer has its own head
count and MLP width, so contraction can shrink layers one by one. Blocks live in a ModuleDict
keyed by a stable id ("0", "1", ... and "3_1" for a block grown after block 3), so inserting or
removing a block never renames the weights of the others.

Packed conversations (`starts`, the positions where a conversation begins) never attend across
each other: each attends causally within its own conversation, and its rotary positions count
from its own first token, so a packed window computes what each conversation alone would.

Shapes in comments: B batch, T time, C model dim, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shared.memory import IGNORE_INDEX, loss_chunk_tokens
from shared.shapes import LayerShape, ModelConfig, RopeScaling

IGNORE_INDEX = -100  # a target with no loss (PyTorch's cross_entropy default ignore_index)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _RMSNorm.apply(x, self.weight, self.eps)
        device = y.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            # Cast once here, where the matmuls that read y would each cast it again and each keep
            # their own copy for the backward pass (q, k and v would keep three).
            y = y.to(torch.get_autocast_dtype(device))
        return y


class _RMSNorm(torch.autograd.Function):
    """x / rms(x) * weight with a hand-written backward: autograd's own graph of the same
    expression makes several more passes over the activations, which is what costs on a CPU.
    Normalises in fp32 whatever the autocast dtype: the mean of squares loses range in bf16."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        n = x32 * r
        ctx.save_for_backward(n, r, weight)
        return n.type_as(x) * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n, r, weight = ctx.saved_tensors
        grad32 = grad.float()
        grad_n = grad32 * weight.float()
        grad_x = r * (grad_n - n * (grad_n * n).mean(-1, keepdim=True))
        grad_weight = (grad32 * n).reshape(-1, n.shape[-1]).sum(0)
        return grad_x.type_as(grad), grad_weight.type_as(weight), None


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None, context_length: int) -> torch.Tensor:
    """Rotary frequencies (D/2,), stretched the way the checkpoint was trained (see RopeScaling)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    original = scaling.original_context_length or context_length
    wavelength = 2 * math.pi / inv_freq
    # 0 at or below the high-frequency wavelength (kept), 1 at or above the low one (divided).
    smooth = (original / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    stretched = torch.where(wavelength > original / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq)
    middle = (wavelength >= original / scaling.high_freq_factor) & (wavelength <= original / scaling.low_freq_factor)
    return torch.where(middle, (1 - smooth) * stretched / scaling.factor + smooth * stretched, stretched)


def rope_tables(
    head_dim: int, length: int, theta: float, device=None, scaling: RopeScaling | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (T, D/2)."""
    inv_freq = rope_frequencies(head_dim, theta, scaling, length).to(device)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, D) by position, with cos and sin (T, D/2), or (B, T, D/2) where each
    sequence has its own positions. Halves layout (as Llama's HF checkpoints use)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = (cos[None, None], sin[None, None]) if cos.dim() == 2 else (cos[:, None], sin[:, None])
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


# Training on a CPU, attention runs in fp32 under bf16 autocast at sequences up to this length:
# PyTorch's CPU flash-attention kernel is several times slower backward in bf16 than in fp32 at
# short sequences and small head dims (docs/memory-plan.md, "Attention on a CPU"); forward it was
# faster in bf16 at every shape measured. GPUs, inference and longer sequences keep the compute dtype.
CPU_FP32_ATTENTION_MAX_LEN = 512


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, **options), with grouped-query heads; in fp32 on a
    CPU while training in bf16 at sequences up to CPU_FP32_ATTENTION_MAX_LEN (returned in q's dtype)."""
    # enable_gqa: query head h reads kv head h // (H / K), without materialising repeated k and v.
    options.setdefault("enable_gqa", k.shape[1] != q.shape[1])
    if (Attention.fp32_on_cpu and q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad
            and k.shape[2] <= CPU_FP32_ATTENTION_MAX_LEN):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **options).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **options)


class Attention(nn.Module):
    fp32_on_cpu = True  # see attend(); off measures on a CPU what a GPU computes and keeps

    def __init__(self, config: ModelConfig, shape: LayerShape):
        super().__init__()
        dim, head_dim, bias = config.dim, config.head_dim, config.qkv_bias
        self.n_heads, self.n_kv_heads, self.head_dim = shape.n_heads, shape.n_kv_heads, head_dim
        self.q_proj = nn.Linear(dim, shape.n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, shape.n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, shape.n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(shape.n_heads * head_dim, dim, bias=False)
        # One weight of D shared by every head, so pruning heads leaves these norms as they are.
        self.q_norm = RMSNorm(head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(head_dim, config.norm_eps) if config.qk_norm else None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: "KVCache | None" = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """mask: (B, 1, T, T) bool, True where a query may attend to a key (packed documents);
        None for plain causal attention."""
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        # Three matmuls, not one over the concatenated weights: autograd would keep that
        # concatenation for the backward pass, a copy of the weights per block that the memory
        # plan does not hold. The three share their saved input x.
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        qk = torch.cat((q.view(B, T, H, D), k.view(B, T, K, D)), dim=2)  # (B, T, H+K, D)
        if self.q_norm is not None:
            q, k = qk.split((H, K), dim=2)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=2)
        qk = apply_rope(qk.transpose(1, 2), cos, sin)  # (B, H+K, T, D), rotated at once
        q, k = qk.split((H, K), dim=1)  # (B, H, T, D), (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        causal = True
        if mask is not None:
            y = attend(q, k, v, attn_mask=mask)  # (B, H, T, D)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))
        if cache is not None:
            # Decoding: the new positions attend to every cached one and causally among themselves.
            k, v = cache.append(self, k, v)  # (B, K, S, D), S = cached + T
            causal = T > 1
            if causal and k.shape[2] > T:
                return self.o_proj(self._attend_masked(q, k, v).transpose(1, 2).reshape(B, T, H * D))
        y = attend(q, k, v, is_causal=causal)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))

    def _attend_masked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        T, S = q.shape[2], k.shape[2]
        # Query i (at position S - T + i) sees keys 0 .. S - T + i.
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        return attend(q, k, v, attn_mask=mask)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy of the output head `weight` (V, C) applied to the final hidden
    states `hidden` (..., C), against `targets` (...): the mean (or sum) over the targets that
    are not IGNORE_INDEX. The same value as F.cross_entropy of the head's logits, without
    ever holding the logits of more than `chunk_tokens` tokens (by default sized by the memory
    plan for the vocabulary).

    The logits are computed in the compute dtype (bf16 under autocast, as the head's matmul
    would) and the log-softmax in fp32; a mean over no scored targets is 0. Where a gradient is
    wanted (grad mode on, and hidden or weight requiring one), it is computed in the same pass,
    from each chunk's logits while they are at hand: the backward pass only scales it, and the
    logits are never computed twice."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"unknown reduction {reduction!r}")
    device = hidden.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else hidden.dtype
    chunk = chunk_tokens or loss_chunk_tokens(weight.shape[0])
    return _ChunkedCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), dtype, chunk, reduction == "mean",
        torch.is_grad_enabled(),
    )


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Computes the loss and, where wanted, its gradients (d loss / d logits = softmax -
    one_hot(target), for scored targets) chunk by chunk in the forward pass, and keeps those
    gradients for the backward pass, which scales them by the loss's own gradient: the hidden
    states' gradient (their size, in their dtype) and the head's weight gradient (fp32, the
    weight's shape; shared.memory counts both). No vocabulary-wide tensor outlives a chunk. One
    backward pass (it scales the kept gradients in place)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, chunk, mean, gradient):
        need_h = gradient and ctx.needs_input_grad[0]
        need_w = gradient and ctx.needs_input_grad[1]
        scored = targets != IGNORE_INDEX
        count = scored.sum()
        # Each token's weight in the loss: 0 where not scored, 1 / count (mean) or 1 (sum) where scored.
        token_weight = scored.float()
        if mean:
            token_weight /= count.clamp(min=1)
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for start in range(0, h.shape[0], chunk):
                rows = slice(start, start + chunk)
                t = targets[rows].clamp(min=0).unsqueeze(1)
                logits = (h[rows] @ w.t()).float()  # (chunk, V)
                picked = logits.gather(1, t).squeeze(1)
                top = logits.amax(dim=-1, keepdim=True)
                exp = logits.sub_(top).exp_()  # in place: the chunk's one fp32 (chunk, V) tensor
                sums = exp.sum(dim=-1)
                lse = top.squeeze(1) + sums.log()
                total += torch.where(scored[rows], lse - picked, 0.0).sum()
                if need_h or need_w:
                    weights = token_weight[rows].unsqueeze(1)
                    g = exp.mul_(weights / sums.unsqueeze(1))  # softmax, weighted
                    g = g.scatter_add_(1, t, -weights).to(dtype)  # - one_hot(target), weighted
                    if need_h:
                        grad_h[rows] = g @ w
                    if need_w:
                        if dtype == torch.float32:
                            grad_w.addmm_(g.t(), h[rows])
                        else:  # summed over chunks in fp32
                            grad_w.add_(g.t() @ h[rows])
                    del g
                del logits, exp
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype, ctx.used = weight.dtype, False
        if mean:
            total = total / count.clamp(min=1)
        return total

    @staticmethod
    def backward(ctx, grad):
        if ctx.used:
            raise RuntimeError("the chunked loss's gradients are scaled in place: one backward pass only")
        ctx.used = True
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h.mul_(grad.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad.float()).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


def chunked_kl_divergence(
    hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of the next-token distributions: the student's
    head `weight` (V, C) on `hidden` (..., C) against the teacher's `teacher_weight` on
    `teacher_hidden` (no gradient to the teacher). F.kl_div(log_softmax(student logits),
    log_softmax(teacher logits), log_target=True, reduction="batchmean") over the tokens, without
    ever holding either model's logits of more than `chunk_tokens` tokens (by default the loss's
    chunk, shared.memory.loss_chunk_tokens). Logits in the compute dtype, softmax in fp32."""
    device = hidden.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else hidden.dtype
    chunk = chunk_tokens or loss_chunk_tokens(weight.shape[0])
    return _ChunkedKLDivergence.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach(),
        teacher_weight.detach(), dtype, chunk,
    )


class _ChunkedKLDivergence(torch.autograd.Function):
    """Keeps for the backward pass both models' hidden states and each token's two fp32
    log-sum-exps, and computes both logits again there, chunk by chunk: d KL / d student logits
    is softmax(student) - softmax(teacher), over the tokens."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, dtype, chunk):
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            ht, wt = teacher_hidden.to(dtype), teacher_weight.to(dtype)
            lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
            teacher_lse = torch.empty_like(lse)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for start in range(0, h.shape[0], chunk):
                rows = slice(start, start + chunk)
                s = (h[rows] @ w.t()).float()  # (chunk, V)
                lse[rows] = torch.logsumexp(s, dim=-1)
                s.sub_(lse[rows, None])  # log p_student
                t = (ht[rows] @ wt.t()).float()
                teacher_lse[rows] = torch.logsumexp(t, dim=-1)
                t.sub_(teacher_lse[rows, None])  # log p_teacher
                p = t.exp()
                total += p.mul_(t.sub_(s)).sum()  # sum p_t (log p_t - log p_s)
                del s, t, p
        ctx.save_for_backward(hidden, weight, teacher_hidden, teacher_weight, lse, teacher_lse)
        ctx.dtype, ctx.chunk = dtype, chunk
        return total / max(1, h.shape[0])

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, teacher_hidden, teacher_weight, lse, teacher_lse = ctx.saved_tensors
        dtype, chunk = ctx.dtype, ctx.chunk
        scale = grad.float() / max(1, hidden.shape[0])
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            ht, wt = teacher_hidden.to(dtype), teacher_weight.to(dtype)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            for start in range(0, h.shape[0], chunk):
                rows = slice(start, start + chunk)
                g = (h[rows] @ w.t()).float().sub_(lse[rows, None]).exp_()  # p_student
                t = (ht[rows] @ wt.t()).float().sub_(teacher_lse[rows, None]).exp_()  # p_teacher
                g = g.sub_(t).mul_(scale).to(dtype)
                del t
                if need_h:
                    grad_h[rows] = g @ w
                if need_w:
                    if dtype == torch.float32:
                        grad_w.addmm_(g.t(), h[rows])
                    else:
                        grad_w.add_(g.t() @ h[rows])
                del g
        return (
            grad_h.to(hidden.dtype) if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            None, None, None, None,
        )


class LMHead(nn.Linear):
    """The output head: the logits of hidden states or, given targets, the loss alone
    (chunked_cross_entropy); given a teacher's (final hidden states, head weight), the
    distillation loss toward it (chunked_kl_divergence), plus the loss of any targets given. A
    module's forward, so that FSDP gathers its weight around it."""

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean",
                teacher: tuple[torch.Tensor, torch.Tensor] | None = None):
        if teacher is not None:
            kl = chunked_kl_divergence(hidden, self.weight, *teacher)
            return kl if targets is None else kl + chunked_cross_entropy(hidden, self.weight, targets, reduction)
        if targets is None:
            return super().forward(hidden)
        return chunked_cross_entropy(hidden, self.weight, targets, reduction)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, shape: LayerShape):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config, shape)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config.dim, shape.mlp_hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: "KVCache | None" = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, mask)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """The model. `config.ids()` fixes both the order of the blocks and their stable names."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        ids = config.ids()
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleDict({bid: Block(config, shape) for bid, shape in zip(ids, config.layers)})
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = LMHead(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = self._rope_tables()
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        return rope_tables(config.head_dim, config.context_length, config.rope_theta, scaling=config.rope_scaling)

    def reset_buffers(self, device: torch.device | str = "cpu") -> "Decoder":
        """The rotary tables again, on `device`: what a model built on the meta device lacks once
        its parameters are real. Computed on the CPU, as __init__ does, so they are bit for bit
        the tables of a model built there."""
        with torch.device("cpu"):
            cos, sin = self._rope_tables()
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)
        return self

    @property
    def block_ids(self) -> list[str]:
        return list(self.blocks.keys())

    def init_weights(self, seed: int = 0) -> "Decoder":
        """GPT-2 style init; residual output projections scaled by 1/sqrt(2 * depth)."""
        generator = torch.Generator().manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=generator) * residual_std)
            else:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        return self

    def forward_hidden(self, idx: torch.Tensor, cache: "KVCache | None" = None,
                       starts: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C) of token ids (B, T), before the output norm.

        With a cache, idx continues the sequence the cache holds (positions start after it).
        starts (B, T) bool: True where a packed document begins; each document then attends only
        to itself, from position 0 (a window's first tokens, before any start, are one document)."""
        start = cache.length if cache is not None else 0
        end = start + idx.shape[1]
        if end > self.config.context_length:
            raise ValueError(f"sequence of {end} tokens exceeds the context length {self.config.context_length}")
        x = self.embed(idx)  # (B, T, C)
        mask = None
        if starts is not None:
            if cache is not None:
                raise ValueError("packed documents are for training and evaluation, not decoding")
            cos, sin, mask = self._document_layout(starts)
        else:
            cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        for block in self.blocks.values():
            x = block(x, cos, sin, cache, mask)
        if cache is not None:
            cache.length = end
        return x

    def _document_layout(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotary tables (B, T, D/2) counted from each document's first token, and the attention
        mask (B, 1, T, T) that keeps each position within its document, causally."""
        T = starts.shape[1]
        index = torch.arange(T, device=starts.device)
        first = torch.where(starts, index, 0).cummax(dim=1).values  # (B, T): where each position's document begins
        positions = index - first
        document = starts.cumsum(dim=1)  # (B, T): which document each position is in
        causal = torch.ones(T, T, dtype=torch.bool, device=starts.device).tril()
        mask = (document[:, :, None] == document[:, None, :]) & causal  # (B, T, T)
        return self.rope_cos[positions], self.rope_sin[positions], mask[:, None]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean",
                starts: torch.Tensor | None = None, teacher: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Logits (B, T, vocab); with targets (B, T), the next-token cross-entropy instead (mean,
        or sum, over the targets that are not IGNORE_INDEX, -100; a batch with none that count has
        loss 0), computed without the logits. starts: see forward_hidden. teacher: (its final
        hidden states, its head's weight): the distillation loss toward it (LMHead)."""
        return self.lm_head(self.norm(self.forward_hidden(idx, starts=starts)), targets, reduction, teacher=teacher)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


class KVCache:
    """Each attention layer's keys and values so far, for decoding one token at a time."""

    def __init__(self):
        self.length = 0
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def append(self, layer: Attention, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of every position so far, these new ones (B, K, T, D) last."""
        if id(layer) in self._kv:
            old_k, old_v = self._kv[id(layer)]
            k, v = torch.cat((old_k, k), dim=2), torch.cat((old_v, v), dim=2)
        self._kv[id(layer)] = (k, v)
        return k, v
