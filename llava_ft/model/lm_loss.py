"""The LM head and the loss only where a label is, in chunks: one chunk of logits alive at a time.

    parts = llm_head_parts(llm)                 # sees through peft; None when the forward cannot be split
    hidden = parts.backbone(input_ids=..., attention_mask=..., position_ids=...)    # [B, T, H] last hidden
    targets = shift_targets(labels)             # targets[b, t] = labels[b, t + 1]; -100 at the end
    rows = targets != IGNORE_INDEX
    logp = chunked_token_logprobs(hidden[rows], parts.lm_head, targets[rows],
                                  logit_softcap=parts.softcap)        # [N] float32 log p(target)
    loss = causal_lm_loss(llm, labels, num_items_in_batch=..., input_ids=... | inputs_embeds=..., ...)

A causal LM's forward with labels builds float32 logits for every position ([B, T, vocab]: 2.5 GB at
4,096 positions with Qwen2.5's 151,936 tokens) and keeps them and their gradient for backward, although
most positions of LLaVA data (image features, prompts) carry no label. Here the decoder runs as usual,
then only the N supervised positions go through the head, `chunk_tokens` rows at a time, inside one
custom autograd function: forward keeps no logits (only, when the head is frozen, d log p / d hidden per
row, [N, H]); backward recomputes a chunk's logits only when the head's own weights train (LoRA on the
head, an unfrozen / tied head). The log-softmax is computed in float32 whatever the compute dtype, as
transformers' loss does.

`causal_lm_loss` gives transformers' ForCausalLMLoss value (sum of -log p over supervised targets,
divided by `num_items_in_batch` when Trainer passes it for gradient accumulation, else by their count).
Preference training (DPO) reuses `chunked_token_logprobs` for per-token answer log-probs.

Liger Kernel's fused linear cross-entropy or Apple's cut-cross-entropy (optional extra
`llava_ft[fused-loss]`) replace the chunked loop for the loss on a CUDA device when importable and the
head is a plain Linear (`fused_loss_backend`); the per-token function always uses the loop.

Written by hand because transformers computes the head on every position, and the fused kernels are
Triton-only (no CPU) and give a loss, not per-token log-probs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Optional

import torch
from torch import nn

from llava_ft import IGNORE_INDEX

DEFAULT_CHUNK_TOKENS = 256

# model_type -> how its CausalLM forward turns the last hidden state into logits. Only architectures
# whose forward is `logits = lm_head(hidden)` (+ Gemma's final tanh softcap) and whose loss is plain
# cross-entropy are listed: a logit scale (Cohere, Granite) or an auxiliary router loss (MoE) would be
# silently lost, so anything else keeps transformers' own forward (with one line saying so).
SPLITTABLE_MODEL_TYPES = frozenset({
    "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "phi", "internlm2",
    "olmo", "olmo2", "starcoder2", "stablelm", "smollm3", "glm", "helium",
})


@dataclasses.dataclass
class HeadParts:
    """What a chunked loss needs from a causal LM: the decoder, its head and Gemma's logit softcap."""

    backbone: Callable[..., torch.Tensor]  # (**forward kwargs) -> last hidden state [B, T, H]
    lm_head: nn.Module
    softcap: Optional[float]


def _unwrap(llm: nn.Module) -> nn.Module:
    """The transformers model under peft's wrappers (LoRA layers stay injected in it)."""
    if hasattr(llm, "get_base_model"):
        return llm.get_base_model()
    return llm


def why_not_splittable(llm: nn.Module) -> Optional[str]:
    """None when `llm_head_parts` can split this model's forward, else the reason in a few words."""
    base = _unwrap(llm)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SPLITTABLE_MODEL_TYPES:
        return f"model_type {model_type!r} is not among the architectures whose head is split"
    if type(base).__module__.startswith("transformers_modules"):
        return "its forward is remote code"
    if not hasattr(base, "get_decoder") or base.get_output_embeddings() is None:
        return "it exposes no decoder / output embeddings"
    if any(p.requires_grad and hasattr(p, "ds_id") for p in base.get_output_embeddings().parameters()):
        # A trainable head (full fine-tune, LoRA on lm_head) is recomputed chunk by chunk in backward, when
        # DeepSpeed ZeRO-3 has already released its gathered weight (a [0]-shaped shard is all that is left).
        return "DeepSpeed ZeRO-3 partitions its trainable LM head, which the chunked loss needs again in backward"
    return None


def llm_head_parts(llm: nn.Module) -> Optional[HeadParts]:
    """(backbone, lm_head, softcap) of a causal LM, through peft wrappers; None if the forward cannot be split.

    The backbone is the model's decoder (with any LoRA layers in it), called with the same keyword
    arguments as the CausalLM forward minus labels / loss kwargs; it returns the last hidden state, the
    tensor the CausalLM forward feeds to `lm_head`.
    """
    if why_not_splittable(llm) is not None:
        return None
    base = _unwrap(llm)
    decoder = base.get_decoder()
    softcap = getattr(base.config, "final_logit_softcapping", None)

    def backbone(**kwargs) -> torch.Tensor:
        for key in ("labels", "num_items_in_batch", "logits_to_keep", "shift_labels"):
            kwargs.pop(key, None)
        kwargs.setdefault("use_cache", False)
        return decoder(**kwargs).last_hidden_state

    return HeadParts(backbone=backbone, lm_head=base.get_output_embeddings(), softcap=softcap)


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """targets[..., t] = labels[..., t + 1], IGNORE_INDEX at the last position (transformers' shift).

    A packed block is shifted the same way as transformers does (the collator already puts -100 on each
    sample's first token, so no target crosses a sample boundary)."""
    return nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def supervised_rows(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden rows [N, H], their targets [N]) for the positions whose next token has a label."""
    targets = shift_targets(labels.to(hidden.device))
    keep = targets != IGNORE_INDEX
    return hidden[keep], targets[keep]


def _autocast_state(device_type: str) -> tuple[bool, Optional[torch.dtype]]:
    if not torch.is_autocast_enabled(device_type):
        return False, None
    return True, torch.get_autocast_dtype(device_type)


def _chunk_logprobs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                    softcap: Optional[float]) -> torch.Tensor:
    """log p(target) for one chunk, log-softmax in float32 (the only [chunk, vocab] tensors live here)."""
    logits = head(hidden).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    return target_logit - torch.logsumexp(logits, dim=-1)


class _ChunkedLogprobs(torch.autograd.Function):
    """log p(target) per row; gradients chunk by chunk so no [N, vocab] tensor ever exists.

    Rows are independent (log p_i depends only on hidden_i), so with a frozen head the forward stores
    d log p_i / d hidden_i per row ([N, H], like the hidden states themselves) and backward only scales it
    by the incoming gradient: no recomputation. When head weights train, their gradient needs the
    incoming per-row weights, so backward recomputes each chunk's logits (one chunk at a time).
    """

    @staticmethod
    def forward(ctx, hidden, targets, head, chunk, softcap, *params):
        device_type = hidden.device.type
        ctx.autocast = _autocast_state(device_type)
        ctx.head, ctx.chunk, ctx.softcap, ctx.n_params = head, chunk, softcap, len(params)
        need_hidden_grad = ctx.needs_input_grad[0]
        precompute = need_hidden_grad and not params
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_rows = torch.empty_like(hidden) if precompute else None
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, start + chunk)
            if precompute:
                with torch.enable_grad():
                    h = hidden[sl].detach().requires_grad_(True)
                    logp = _chunk_logprobs(head, h, targets[sl], softcap)
                    (grad_rows[sl],) = torch.autograd.grad(logp.sum(), h)
                out[sl] = logp.detach()
            else:
                with torch.no_grad():
                    out[sl] = _chunk_logprobs(head, hidden[sl], targets[sl], softcap)
        if precompute:
            ctx.save_for_backward(grad_rows)
        else:
            ctx.save_for_backward(hidden, targets)
        ctx.precompute = precompute
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.precompute:
            (grad_rows,) = ctx.saved_tensors
            grad_hidden = grad_rows * grad_out[:, None].to(grad_rows.dtype)
            return (grad_hidden, None, None, None, None)
        hidden, targets = ctx.saved_tensors
        params = [p for p in ctx.head.parameters() if p.requires_grad]
        assert len(params) == ctx.n_params
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_params = [None] * len(params)
        enabled, dtype = ctx.autocast
        device_type = hidden.device.type
        for start in range(0, hidden.shape[0], ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            autocast = torch.autocast(device_type, dtype=dtype) if enabled else contextlib.nullcontext()
            with torch.enable_grad(), autocast:
                h = hidden[sl].detach().requires_grad_(grad_hidden is not None)
                logp = _chunk_logprobs(ctx.head, h, targets[sl], ctx.softcap)
                inputs = ([h] if grad_hidden is not None else []) + params
                grads = torch.autograd.grad(logp, inputs, grad_out[sl], allow_unused=True)
            if grad_hidden is not None:
                grad_hidden[sl] = grads[0]
                grads = grads[1:]
            for i, g in enumerate(grads):
                if g is not None:
                    grad_params[i] = g if grad_params[i] is None else grad_params[i] + g
        return (grad_hidden, None, None, None, None, *grad_params)


def chunked_token_logprobs(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor,
                           chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                           logit_softcap: Optional[float] = None) -> torch.Tensor:
    """float32 log p(targets[i] | hidden[i]) for each row of `hidden` [N, H] through `lm_head`.

    Differentiable w.r.t. `hidden` and the head's trainable weights (LoRA on the head, a tied embedding);
    at most one [chunk_tokens, vocab] block of logits (and its gradient) exists at a time, in forward and
    backward. `logit_softcap` is Gemma's final_logit_softcapping (tanh(logits / c) * c).
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, H] and targets [N]; got {tuple(hidden.shape)} and "
                         f"{tuple(targets.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    targets = targets.to(hidden.device)
    params = [p for p in lm_head.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
    if hidden.shape[0] == 0:
        # No supervised token: a zero-length result still connected to the graph.
        return hidden.sum(-1).float() * 0.0
    return _ChunkedLogprobs.apply(hidden, targets, lm_head, int(chunk_tokens), logit_softcap, *params)


# ---- the loss, with the optional fused GPU kernels -----------------------------------------------------

@functools.lru_cache(maxsize=None)
def _importable(name: str) -> bool:
    try:
        __import__(name)
    except Exception:  # ImportError, or a broken Triton build raising anything at import
        return False
    return True


def fused_loss_backend(hidden: torch.Tensor, lm_head: nn.Module, kernel: str = "auto") -> str:
    """'liger' | 'cce' | 'chunked' for the loss of these rows through this head.

    The fused kernels run only on CUDA, for a plain Linear head (no LoRA on it) without bias; `kernel`
    is `train.loss_kernel`: auto (liger, else cce, else chunked), liger, cce or chunked.
    """
    if kernel == "chunked" or hidden.device.type != "cuda":
        return "chunked"
    if type(lm_head) is not nn.Linear or lm_head.bias is not None:
        return "chunked"
    for name, module in (("liger", "liger_kernel"), ("cce", "cut_cross_entropy")):
        if kernel in ("auto", name) and _importable(module):
            return name
    return "chunked"


def _fused_loss_sum(backend: str, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    softcap: Optional[float]) -> torch.Tensor:
    """Sum over rows of -log p(target) by a fused GPU kernel (float32 result)."""
    if backend == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        out = liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="sum", softcap=softcap)
        return (out[0] if isinstance(out, tuple) else out).float()  # some versions return (loss, z_loss)
    from cut_cross_entropy import linear_cross_entropy
    return linear_cross_entropy(hidden, weight, targets, softcap=softcap, reduction="sum").float()


def token_nll_sum(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor,
                  chunk_tokens: int = DEFAULT_CHUNK_TOKENS, logit_softcap: Optional[float] = None,
                  kernel: str = "auto") -> torch.Tensor:
    """Sum of -log p(target) over the rows [N, H] (float32 scalar), fused kernel or chunked loop."""
    backend = fused_loss_backend(hidden, lm_head, kernel)
    if backend != "chunked" and hidden.shape[0]:
        return _fused_loss_sum(backend, hidden, lm_head.weight, targets.to(hidden.device), logit_softcap)
    return -chunked_token_logprobs(hidden, lm_head, targets, chunk_tokens, logit_softcap).sum()


def normalise_loss(nll_sum: torch.Tensor, n_targets: int, num_items_in_batch: Any = None) -> torch.Tensor:
    """transformers' reduction: / num_items_in_batch when given (gradient accumulation), else the mean
    over supervised targets (NaN when there is none, as cross_entropy's mean gives)."""
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(nll_sum.device)
        return nll_sum / num_items_in_batch
    return nll_sum / n_targets


def causal_lm_loss(parts: HeadParts, hidden: torch.Tensor, labels: torch.Tensor,
                   num_items_in_batch: Any = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                   kernel: str = "auto") -> torch.Tensor:
    """transformers' causal-LM loss from the last hidden state [B, T, H] and unshifted labels [B, T]."""
    rows, targets = supervised_rows(hidden, labels)
    nll = token_nll_sum(rows, parts.lm_head, targets, chunk_tokens, parts.softcap, kernel)
    return normalise_loss(nll, rows.shape[0], num_items_in_batch)
