"""The chunked LM head + loss (llava_ft.model.lm_loss) against transformers' own forward with labels.

Equality of loss and gradients in fp32 (1e-5) for every architecture load_llm accepts, tied / untied
heads, LoRA on the head or not, num_items_in_batch and packed rows; the bound on the largest logits
tensor is checked with a saved-tensor hook and a forward hook on the head.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from llava_ft import IGNORE_INDEX
from llava_ft.model import lm_loss

VOCAB = 97


def _tiny(arch: str, tie: bool = False, seed: int = 0):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=tie, pad_token_id=0)
    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {}),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {"head_dim": 8}),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"head_dim": 8, "final_logit_softcapping": 3.0}),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {}),
    }
    config_cls, model_cls, extra = classes[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**common, **extra)).float()
    model.config._attn_implementation = "eager"
    return model


def _batch(seed: int = 1, batch: int = 2, length: int = 24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    labels = ids.clone()
    labels[:, :length // 3] = IGNORE_INDEX  # a prompt
    mask = torch.ones_like(ids)
    if batch > 1:
        labels[1, -5:] = IGNORE_INDEX  # padding
        mask[1, -5:] = 0
    return ids, mask, labels


def _ours(model, ids, mask, labels, chunk=5, num_items=None):
    parts = lm_loss.llm_head_parts(model)
    hidden = parts.backbone(input_ids=ids, attention_mask=mask)
    return lm_loss.causal_lm_loss(parts, hidden, labels, num_items_in_batch=num_items, chunk_tokens=chunk)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(model, ids, mask, labels, chunk=5, num_items=None):
    model.zero_grad()
    kwargs = {"num_items_in_batch": num_items} if num_items is not None else {}
    ref = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs).loss
    ref.backward()
    ref_grads = _grads(model)
    model.zero_grad()
    loss = _ours(model, ids, mask, labels, chunk, num_items)
    loss.backward()
    grads = _grads(model)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma", "gemma2", "phi3"])
def test_loss_and_grads_equal_transformers_per_architecture(arch):
    model = _tiny(arch)
    assert lm_loss.why_not_splittable(model) is None
    _compare(model, *_batch())


@pytest.mark.parametrize("tie", [False, True])
def test_tied_and_untied_heads_train_the_head(tie):
    model = _tiny("qwen2", tie=tie)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tie
    _compare(model, *_batch(), chunk=4)  # the head trains here: the recompute-in-backward path


def test_num_items_in_batch_normalisation():
    model = _tiny("llama")
    ids, mask, labels = _batch()
    _compare(model, ids, mask, labels, num_items=torch.tensor(40))


def test_lora_on_the_head_and_not():
    from peft import LoraConfig, get_peft_model

    for targets in (["q_proj", "v_proj"], ["q_proj", "lm_head"]):
        model = get_peft_model(_tiny("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                          init_lora_weights=False))
        parts = lm_loss.llm_head_parts(model)
        assert parts is not None
        assert any(p.requires_grad for p in parts.lm_head.parameters()) == ("lm_head" in targets)
        _compare(model, *_batch(), chunk=3)


def test_packed_rows_equal_transformers():
    model = _tiny("qwen2")
    ids, _, labels = _batch(batch=1, length=30)
    position_ids = torch.cat([torch.arange(12), torch.arange(18)])[None]
    labels[0, 12] = IGNORE_INDEX  # a packed sample's first token carries no label
    model.zero_grad()
    # No cache, as LlavaFtModel.forward calls a packed batch (a cache switches packed detection off).
    ref = model(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False).loss
    unpacked = model(input_ids=ids, position_ids=torch.arange(30)[None], labels=labels, use_cache=False).loss
    assert not torch.allclose(ref, unpacked)  # the blocks really are attended separately
    parts = lm_loss.llm_head_parts(model)
    hidden = parts.backbone(input_ids=ids, position_ids=position_ids)
    torch.testing.assert_close(lm_loss.causal_lm_loss(parts, hidden, labels, chunk_tokens=7), ref,
                               rtol=1e-5, atol=1e-5)


def test_token_logprobs_match_log_softmax_and_grads_with_weights():
    torch.manual_seed(0)
    head = nn.Linear(16, VOCAB, bias=False)
    head.weight.requires_grad_(False)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, VOCAB, (23,))
    weights = torch.randn(23)  # per-token weights, as a DPO loss applies them
    for softcap in (None, 2.5):
        hidden.grad = None
        logits = head(hidden)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        ref = torch.log_softmax(logits.float(), -1).gather(1, targets[:, None]).squeeze(1)
        (ref * weights).sum().backward()
        ref_grad = hidden.grad.clone()
        hidden.grad = None
        out = lm_loss.chunked_token_logprobs(hidden, head, targets, chunk_tokens=4, logit_softcap=softcap)
        assert out.dtype == torch.float32 and out.shape == (23,)
        (out * weights).sum().backward()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hidden.grad, ref_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_trains", [False, True])
def test_at_most_one_chunk_of_logits_exists(head_trains):
    """Every tensor the head produces and every tensor saved for backward is at most chunk x vocab."""
    torch.manual_seed(0)
    chunk, n = 8, 50
    head = nn.Linear(16, VOCAB, bias=False)
    head.weight.requires_grad_(head_trains)
    hidden = torch.randn(n, 16, requires_grad=True)
    targets = torch.randint(0, VOCAB, (n,))
    sizes = []
    hook = head.register_forward_hook(lambda mod, inp, out: sizes.append(out.shape[0]))

    weight_storage = head.weight.untyped_storage().data_ptr()

    def pack(t):
        logits_like = t.dim() == 2 and VOCAB in t.shape and t.untyped_storage().data_ptr() != weight_storage
        sizes.append(t.numel() // VOCAB if logits_like else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lm_loss.chunked_token_logprobs(hidden, head, targets, chunk_tokens=chunk)
        (-out.mean()).backward()
    hook.remove()
    assert max(sizes) == chunk
    assert hidden.grad is not None and (head.weight.grad is not None) == head_trains
    # The unchunked path would hold n x vocab (the hook sees it, so the check above can fail).
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.log_softmax(head(hidden), -1).sum().backward()
    assert max(sizes) == n


def test_bf16_autocast_log_softmax_in_fp32():
    torch.manual_seed(0)
    head = nn.Linear(16, VOCAB, bias=False)
    hidden = torch.randn(10, 16, requires_grad=True)
    targets = torch.randint(0, VOCAB, (10,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lm_loss.chunked_token_logprobs(hidden, head, targets, chunk_tokens=3)
        ref = torch.log_softmax(head(hidden).float(), -1).gather(1, targets[:, None]).squeeze(1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert head.weight.grad is not None and hidden.grad is not None


def test_unknown_architecture_is_not_split():
    import transformers as tf

    cfg = tf.CohereConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2)
    model = tf.CohereForCausalLM(cfg)  # scales its logits: splitting would change the loss
    assert lm_loss.llm_head_parts(model) is None
    assert "cohere" in lm_loss.why_not_splittable(model)


def test_llava_ft_model_falls_back_with_one_line(capsys):
    import transformers as tf

    from llava_ft.model.llava import LlavaFtModel

    cfg = tf.CohereConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, logit_scale=0.5)
    llm = tf.CohereForCausalLM(cfg)
    model = LlavaFtModel(llm)
    ids, mask, labels = _batch()
    for _ in range(2):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, llm(input_ids=ids, attention_mask=mask, labels=labels).loss)
    assert out.logits is not None  # transformers' forward ran
    lines = [line for line in capsys.readouterr().out.splitlines() if "every position" in line]
    assert len(lines) == 1 and "cohere" in lines[0]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["liger", "cce"])
def test_fused_kernels_equal_the_chunked_loop(kernel):
    module = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}[kernel]
    pytest.importorskip(module)
    torch.manual_seed(0)
    head = nn.Linear(64, 1000, bias=False).cuda()
    head.weight.requires_grad_(False)
    hidden = torch.randn(300, 64, device="cuda", requires_grad=True)
    targets = torch.randint(0, 1000, (300,), device="cuda")
    assert lm_loss.fused_loss_backend(hidden, head, kernel) == kernel
    fused = lm_loss.token_nll_sum(hidden, head, targets, kernel=kernel)
    (grad_fused,) = torch.autograd.grad(fused, hidden)
    loop = lm_loss.token_nll_sum(hidden, head, targets, kernel="chunked")
    (grad_loop,) = torch.autograd.grad(loop, hidden)
    torch.testing.assert_close(fused, loop, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(grad_fused, grad_loop, rtol=1e-3, atol=1e-4)
