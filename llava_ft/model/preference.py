"""Shared-prefix sequence log-probs: each preference pair's prompt and images run once.

    logps = model(**batch)        # LlavaFtModel.forward routes a preference batch (it has `pair_index`) here
    logps = sequence_logps(model, batch)   # the same, directly; batch from data.preference_collate
    logps.chosen, logps.rejected            # [pairs] summed log p of each answer's supervised tokens

The splice of `LlavaFtModel` expands the images, then the LLM's decoder gets a 4D additive mask (prompt
causal; each answer causal over the prompt and itself, never the other answer; nothing across pairs) and
positions that continue from the prompt for BOTH answers, so every answer token sees exactly what it
would see in its own prompt + answer sequence: loss and gradients equal the duplicated computation of
TRL / LLaMA-Factory / XTuner (tests/test_preference.py). transformers passes a user 4D mask through
unchanged (masking_utils returns it as-is): boolean for sdpa, additive for eager; flash-attention takes no such mask, so
preference runs use sdpa (engine.run says so). Only the supervised answer positions go through the LM
head, in chunks (llava_ft.model.lm_loss), as in SFT.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llava_ft import IGNORE_INDEX
from llava_ft.model.lm_loss import chunked_token_logprobs, llm_head_parts


@dataclass
class SequenceLogps:
    """Per pair (shape [pairs]): summed token log-probs of each answer and how many tokens they cover."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def detach(self) -> "SequenceLogps":
        return SequenceLogps(self.chosen.detach(), self.rejected.detach(), self.chosen_tokens, self.rejected_tokens)


PROMPT, CHOSEN, REJECTED = 0, 1, 2


def _block_layout(pair, seg, real):
    """Positions, predictor slots and the 4D allowed-mask of a spliced shared-prefix batch.

    pair/seg: [R, T] per slot (-1 on padding). Every group (a pair's prompt, chosen, rejected) is contiguous.
    """
    rows, width = pair.shape
    device = pair.device
    idx = torch.arange(width, device=device).expand(rows, width)
    key = torch.where(real, pair * 3 + seg, -1)
    starts = torch.ones_like(real)
    starts[:, 1:] = key[:, 1:] != key[:, :-1]
    group_start = torch.cummax(torch.where(starts, idx, 0), dim=1).values
    within = idx - group_start
    n_pairs = int(pair.max()) + 1 if bool(real.any()) else 0
    safe_pair = pair.clamp(min=0)
    counts = torch.zeros((3, max(n_pairs, 1)), dtype=torch.long, device=device)
    for kind in (PROMPT, CHOSEN):
        sel = real & (seg == kind)
        counts[kind].index_add_(0, pair[sel], torch.ones_like(pair[sel]))
    prompt_len = counts[PROMPT][safe_pair]
    positions = torch.where(real & (seg > PROMPT), prompt_len + within, within)
    positions = torch.where(real, positions, within)  # padding: a run of its own
    # The token at slot s is predicted by slot s-1, except each answer's first token: by the prompt's last
    # slot (for the rejected answer that lies before the chosen one).
    first_rejected = real & (seg == REJECTED) & (within == 0)
    predictor = idx - 1 - torch.where(first_rejected, counts[CHOSEN][safe_pair], 0)
    q_pair, k_pair = pair[:, :, None], pair[:, None, :]
    q_seg, k_seg = seg[:, :, None], seg[:, None, :]
    allowed = ((q_pair == k_pair) & (k_pair >= 0) & (idx[:, None, :] <= idx[:, :, None])
               & ((k_seg == PROMPT) | (k_seg == q_seg)))
    allowed = allowed | torch.eye(width, dtype=torch.bool, device=device)[None]  # padding sees itself
    return positions, predictor, allowed[:, None], n_pairs


def sequence_logps(model, batch: dict) -> SequenceLogps:
    """Summed log-probs of every pair's chosen and rejected supervised tokens, prompt run once per pair."""
    ids, real_tokens = batch["input_ids"], batch["attention_mask"].bool()
    rows, width = ids.shape
    original = torch.arange(width, device=ids.device).expand(rows, width).contiguous()
    if getattr(model, "visual_encoder", None) is not None:
        # The splice carries `labels` along with the features; passing each token's own index as the label
        # tells where every token went (image features and padding come back as IGNORE_INDEX).
        embeds, mask, kept, _ = model.prepare_inputs_embeds(
            ids, batch["attention_mask"], original, batch.get("pixel_values"), padding_side="right",
            image_sizes=batch.get("image_sizes"))
        real = mask.bool()
        text_slot = kept >= 0
        # An image's features belong to its placeholder: the token right after the previous text token.
        previous = torch.cummax(torch.where(text_slot, kept, -1), dim=1).values
        src = torch.where(text_slot, kept, previous + 1).clamp(max=width - 1)
    else:
        embeds = model.get_input_embeddings()(ids)
        real, src, text_slot = real_tokens, original, real_tokens
    pair = torch.where(real, torch.gather(batch["pair_index"], 1, src), -1)
    seg = torch.where(real, torch.gather(batch["segment"], 1, src), -1)
    targets = torch.where(real & text_slot, torch.gather(batch["targets"], 1, src), IGNORE_INDEX)
    positions, predictor, allowed, n_pairs = _block_layout(pair, seg, real)
    if getattr(model.llm.config, "_attn_implementation", "sdpa") == "eager":
        # eager attention adds the mask to the scores: 0 where allowed, the dtype's minimum elsewhere
        mask4d = torch.zeros(allowed.shape, dtype=embeds.dtype, device=embeds.device).masked_fill(
            ~allowed, torch.finfo(embeds.dtype).min)
    else:  # sdpa takes a boolean mask whatever dtype autocast gives the queries
        mask4d = allowed.to(embeds.device)
    sel = targets != IGNORE_INDEX
    row_idx, slot_idx = torch.nonzero(sel, as_tuple=True)
    pred_idx, tgt = predictor[row_idx, slot_idx], targets[row_idx, slot_idx]
    call = dict(inputs_embeds=embeds, attention_mask=mask4d, position_ids=positions, use_cache=False)
    parts = llm_head_parts(model.llm)
    if parts is not None:
        hidden = parts.backbone(**call)
        logp = chunked_token_logprobs(hidden[row_idx, pred_idx], parts.lm_head, tgt, logit_softcap=parts.softcap)
    else:  # an architecture whose head lm_loss does not split (remote code, logit scales): its own forward
        logits = model.llm(**call).logits[row_idx, pred_idx].float()
        logp = torch.log_softmax(logits, -1).gather(-1, tgt[:, None])[:, 0]
    answer = pair[row_idx, slot_idx] * 2 + (seg[row_idx, slot_idx] - CHOSEN)
    sums = torch.zeros(2 * n_pairs, dtype=logp.dtype, device=logp.device).index_add(0, answer, logp)
    counts = torch.zeros(2 * n_pairs, dtype=torch.long, device=logp.device).index_add(
        0, answer, torch.ones_like(answer))
    return SequenceLogps(sums[0::2], sums[1::2], counts[0::2], counts[1::2])
