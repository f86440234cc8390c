"""LlavaFtModel: the one training/inference module for both text-only and LLaVA runs.

    model = LlavaFtModel(llm)                                   # text SFT / QLoRA
    model = LlavaFtModel(llm, visual_encoder, projector)        # LLaVA
    out = model(input_ids, attention_mask, labels, pixel_values=pixel_values)   # out.loss (logits: no labels)
    new_tokens = model.generate(input_ids, attention_mask, pixel_values, max_new_tokens=32)

`input_ids` carry one `IMAGE_TOKEN_INDEX` (-200) per image; `forward` replaces each by that image's N
projected feature vectors (label -100, attention 1), re-pads the batch and rebuilds `position_ids`.
Images in `pixel_values` are in the order their placeholders appear (row-major). A batch with
`pixel_values` but no placeholder is the collator's dummy image: its features enter the graph multiplied
by 0 so the vision tower and projector run on every rank (ZeRO-3 cannot hang on mixed batches).

Packed batches (`data.pack_to_max_length`): `position_ids` one per input id, restarting at 0 at each
sample's first token, and no attention_mask, in ONE row (the collators flatten the blocks of a batch; a
multi-row packed batch is flattened here). The splice expands them with the features (an image's N
vectors take N consecutive positions, later tokens shift by N-1, a sample still starts at 0) and calls
the LLM without attention_mask and without cache, so transformers builds a block-diagonal mask (varlen
flash-attention on GPU) from the expanded positions and attention never crosses samples.

The module is a plain `nn.Module` that `transformers.Trainer` can drive: it exposes `config`,
`main_input_name`, `hf_device_map`/`quantization_method` (so Trainer does not move a device-mapped or
bnb-quantized LLM), and `activation_checkpointing_enable` / `gradient_checkpointing_enable` delegating
to the LLM. Trainer's own `_save` cannot save it as a PreTrainedModel; the engine saves
`trainable_state_dict()` instead. Attribute names `llm`, `visual_encoder`, `projector` define the
parameter groups for per-module learning rates (`module_of(param_name)`).
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from llava_ft import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_ft.errors import UserError
from llava_ft.model import lm_loss

# Top-level submodule names; the engine uses them to build optimizer param groups.
MODULE_NAMES = ("llm", "visual_encoder", "projector")


class LlavaFtModel(nn.Module):
    """An LLM, optionally with a vision tower and a projector whose features are spliced into the text."""

    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # Rows of the LM head per chunk when labels are given (train.loss_chunk_tokens; 0: transformers' loss).
    loss_chunk_tokens = lm_loss.DEFAULT_CHUNK_TOKENS

    def __init__(self, llm: nn.Module, visual_encoder: Optional[nn.Module] = None,
                 projector: Optional[nn.Module] = None):
        super().__init__()
        if (visual_encoder is None) != (projector is None):
            raise ValueError("LlavaFtModel needs both visual_encoder and projector, or neither (text-only)")
        self.llm = llm
        self.visual_encoder = visual_encoder
        self.projector = projector
        if visual_encoder is not None:
            # The LLM may be device-mapped / quantized (Trainer then does not move the wrapper): put the
            # small vision parts where the token embeddings live so the splice needs no copies later.
            device = self.llm.get_input_embeddings().weight.device
            if device.type != "meta":
                visual_encoder.to(device)
                projector.to(device)

    # ---- attributes transformers.Trainer and generation code look up ----------------------------
    @property
    def config(self):
        return self.llm.config

    @property
    def generation_config(self):
        return getattr(self.llm, "generation_config", None)

    @property
    def hf_device_map(self):
        # Absent (AttributeError), not None, when the LLM has none: accelerate calls len() on any it finds.
        device_map = getattr(self.llm, "hf_device_map", None)
        if device_map is None:
            raise AttributeError("hf_device_map")
        return device_map

    @property
    def quantization_method(self):
        return getattr(self.llm, "quantization_method", None)

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether the LLM's forward takes loss kwargs (`num_items_in_batch`). transformers.Trainer reads this
        to decide who normalises the loss over gradient accumulation; `forward` drops them otherwise."""
        cached = self.__dict__.get("_accepts_loss_kwargs")
        if cached is None:
            base = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
            declared = getattr(base, "accepts_loss_kwargs", None)
            if isinstance(declared, bool):
                cached = declared
            else:
                params = inspect.signature(base.forward).parameters.values()
                cached = any(p.kind is inspect.Parameter.VAR_KEYWORD or p.name == "num_items_in_batch"
                             for p in params)
            self.__dict__["_accepts_loss_kwargs"] = cached
        return cached

    @property
    def is_llava(self) -> bool:
        return self.visual_encoder is not None

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False):
        """Checkpoint the LLM's decoder layers (the vision tower is small next to them, and usually frozen)."""
        kwargs = activation_checkpointing_kwargs or {"use_reentrant": False}
        base = self.llm
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs,
                                                 every_n_layers=every_n_layers, offload=offload)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        """Older name of `activation_checkpointing_enable` (transformers < 5 and PEFT call this)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self):
        if hasattr(self.llm, "activation_checkpointing_disable"):
            self.llm.activation_checkpointing_disable()
        else:
            self.llm.gradient_checkpointing_disable()

    gradient_checkpointing_disable = activation_checkpointing_disable

    # ---- trainable weights ----------------------------------------------------------------------
    @staticmethod
    def module_of(param_name: str) -> str:
        """'llm' | 'visual_encoder' | 'projector' for a `named_parameters()` name (param groups)."""
        head = param_name.split(".", 1)[0]
        if head not in MODULE_NAMES:
            raise ValueError(f"parameter {param_name!r} belongs to no known module {MODULE_NAMES}")
        return head

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the weights that train (LoRA, projector, unfrozen parts), named as `named_parameters()`."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state_dict: dict, strict: bool = True, source: str = "state dict") -> list:
        """Copy weights by name into this model; returns the loaded names.

        Every key must name a parameter of this model (else UserError listing the unexpected keys).
        With `strict`, every trainable parameter must be present too (else UserError listing the missing
        ones); `strict=False` is for loading a pretrain checkpoint (projector only) into a finetune model.
        Shapes must match. Never a silent partial load.
        """
        params = dict(self.named_parameters())
        unexpected = sorted(k for k in state_dict if k not in params)
        missing = sorted(n for n, p in params.items() if p.requires_grad and n not in state_dict) if strict else []
        if unexpected or missing:
            lines = [f"{source} does not match the model:"]
            if unexpected:
                lines.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}"
                             + (" ..." if len(unexpected) > 10 else ""))
            if missing:
                lines.append(f"missing keys ({len(missing)}): {', '.join(missing[:10])}"
                             + (" ..." if len(missing) > 10 else ""))
            lines.append("Was it saved from a run with the same model, LoRA and projector settings?")
            raise UserError(" ".join(lines))
        bad_shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(params[k].shape)}"
                      for k, v in state_dict.items() if tuple(v.shape) != tuple(params[k].shape)]
        if bad_shapes:
            raise UserError(f"{source}: shape mismatch for {len(bad_shapes)} weights: {'; '.join(bad_shapes[:5])}."
                            " Check projector_depth, LoRA r and the model sizes against the run that saved it.")
        with torch.no_grad():
            for k, v in state_dict.items():
                params[k].copy_(v.to(device=params[k].device, dtype=params[k].dtype))
        return sorted(state_dict)

    # ---- vision path ----------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, pack=None):
        """[n, 3, H, W] -> projected features [n, num_image_tokens, llm_hidden] (with `pack`, the
        projector's per-image AnyRes list)."""
        ve = self.visual_encoder
        ve_param = next(ve.parameters())
        trains = any(p.requires_grad for p in ve.parameters())
        # A frozen tower without LoRA needs no activations kept for backward.
        with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
            feats = ve(pixel_values.to(device=ve_param.device, dtype=ve_param.dtype))
        proj_param = next(self.projector.parameters())
        return self.projector(feats.to(device=proj_param.device, dtype=proj_param.dtype), pack=pack)

    def encode_images_per_image(self, pixel_values: torch.Tensor, image_sizes=None):
        """Projected features per image: a [n, N, D] tensor, or with AnyRes (`image_sizes` given, the
        tower set to anyres) a list of [tokens_i, D] -- overview, unpadded tiles, a newline per row."""
        spec = getattr(self.visual_encoder, "anyres", None)
        if image_sizes is None or spec is None:
            return self.encode_images(pixel_values)
        sizes = image_sizes.tolist()
        # The projector packs (its forward reads the newline), so ZeRO-3 gathers the newline with it.
        return self.encode_images(pixel_values, pack=lambda feats, newline: spec.pack(feats, sizes, newline))

    def prepare_inputs_embeds(self, input_ids, attention_mask=None, labels=None, pixel_values=None,
                              padding_side: str = "right", image_sizes=None, position_ids=None):
        """Splice image features into the token embeddings.

        Returns (inputs_embeds, attention_mask, labels or None, position_ids). Rows are re-padded on
        `padding_side` (right for training, left for batched generation); nothing is truncated.
        With `position_ids` (a packed batch: one per input id, 0 at each sample's first token, no
        attention_mask) the returned attention_mask is None and the positions are the packed ones expanded
        over the image features; re-padding then forms a segment of its own (positions 0, 1, ...).
        """
        packed = position_ids is not None
        if packed and padding_side != "right":
            raise ValueError("packed batches (position_ids) are right-padded training batches")
        if packed and attention_mask is not None:
            raise UserError("a packed batch (position_ids) must come without attention_mask: transformers "
                            "reads the sample boundaries from position_ids only when no mask is given")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.long)
        embed = self.llm.get_input_embeddings()
        is_image = input_ids == IMAGE_TOKEN_INDEX
        n_placeholders = int(is_image.sum())
        # The placeholder id is not a vocabulary entry: embed token 0 there, those rows are replaced.
        text_embeds = embed(input_ids.masked_fill(is_image, 0))
        if pixel_values is None:
            if n_placeholders:
                raise UserError(f"input_ids hold {n_placeholders} <image> placeholders but no pixel_values were given")
            features = None
        else:
            shape = getattr(self.visual_encoder, "image_shape", None)
            if n_placeholders == 0 and shape and tuple(pixel_values.shape[1:]) != tuple(shape):
                # A dummy image made without knowing the tower's input size: use one of the right size.
                pixel_values = pixel_values.new_zeros((1, *shape))
            if n_placeholders == 0:
                image_sizes = None  # a dummy image is one plain view
            features = self.encode_images_per_image(pixel_values, image_sizes)
            features = [f.to(text_embeds.dtype) for f in features] if isinstance(features, list) \
                else features.to(text_embeds.dtype)
            if n_placeholders == 0:
                # Dummy image of a text-only batch: keep the vision path in the graph with zero effect.
                text_embeds = text_embeds + features.sum() * 0.0
                features = None
            elif len(features) != n_placeholders:
                raise UserError(f"batch has {n_placeholders} <image> placeholders but {len(features)} images; "
                                "each sample needs exactly one image per <image> in its text")
        if features is None:
            if packed:
                return text_embeds, None, labels, position_ids
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            return text_embeds, attention_mask, labels, position_ids

        rows_e, rows_l, rows_start = [], [], []
        next_image = 0
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b].bool()
            ids_b, emb_b = input_ids[b][keep], text_embeds[b][keep]
            lab_b = labels[b][keep] if labels is not None else None
            # Packed: True where a sample starts; an image placeholder's flag goes to its first feature.
            start_b = (position_ids[b][keep] == 0) if packed else None
            img_pos = torch.nonzero(ids_b == IMAGE_TOKEN_INDEX).flatten().tolist()
            seg_e, seg_l, seg_s, start = [], [], [], 0
            for pos in img_pos + [ids_b.shape[0]]:
                seg_e.append(emb_b[start:pos])
                if lab_b is not None:
                    seg_l.append(lab_b[start:pos])
                if packed:
                    seg_s.append(start_b[start:pos])
                if pos < ids_b.shape[0]:
                    feat = features[next_image]
                    next_image += 1
                    seg_e.append(feat)
                    if lab_b is not None:
                        seg_l.append(torch.full((feat.shape[0],), IGNORE_INDEX, dtype=lab_b.dtype, device=lab_b.device))
                    if packed:
                        flags = torch.zeros(feat.shape[0], dtype=torch.bool, device=start_b.device)
                        flags[0] = start_b[pos]
                        seg_s.append(flags)
                start = pos + 1
            rows_e.append(torch.cat(seg_e))
            if lab_b is not None:
                rows_l.append(torch.cat(seg_l))
            if packed:
                rows_start.append(torch.cat(seg_s))

        max_len = max(r.shape[0] for r in rows_e)
        n, dim = len(rows_e), text_embeds.shape[-1]
        device = text_embeds.device
        new_embeds = text_embeds.new_zeros((n, max_len, dim))
        new_mask = torch.zeros((n, max_len), dtype=attention_mask.dtype, device=device)
        new_pos = torch.zeros((n, max_len), dtype=torch.long, device=device)
        new_labels = (torch.full((n, max_len), IGNORE_INDEX, dtype=labels.dtype, device=device)
                      if labels is not None else None)
        for b, row in enumerate(rows_e):
            length = row.shape[0]
            sl = slice(0, length) if padding_side == "right" else slice(max_len - length, max_len)
            new_embeds[b, sl] = row
            new_mask[b, sl] = 1
            new_pos[b, sl] = torch.arange(length, device=device)
            if new_labels is not None:
                new_labels[b, sl] = rows_l[b]
            if packed:
                # Position = distance to the latest sample start; the right padding restarts at 0.
                idx = torch.arange(max_len, device=device)
                starts = torch.ones(max_len, dtype=torch.bool, device=device)
                starts[:length] = rows_start[b].to(device)
                starts[0] = True
                new_pos[b] = idx - torch.cummax(torch.where(starts, idx, 0), dim=0).values
        if packed:
            return new_embeds, None, new_labels, new_pos
        return new_embeds, new_mask, new_labels, new_pos

    # ---- forward / generate ---------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, labels=None, position_ids=None, pixel_values=None,
                image_sizes=None, **kwargs):
        """Same outputs as the LLM's forward (loss when labels are given, logits).

        A preference batch (data.preference_collate: it carries `pair_index`) returns instead a dict of the
        pairs' answer log-probs (llava_ft.model.preference, fields of SequenceLogps)."""
        if "pair_index" in kwargs:
            from llava_ft.model.preference import sequence_logps

            batch = dict(kwargs, input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                         image_sizes=image_sizes)
            return vars(sequence_logps(self, batch))
        if "num_items_in_batch" in kwargs and not self.accepts_loss_kwargs:
            kwargs.pop("num_items_in_batch")  # an LLM whose forward lacks it (e.g. older remote code)
        packed = position_ids is not None and attention_mask is None
        if packed:
            kwargs["use_cache"] = False  # a KV cache switches transformers' packed-sequence detection off
            if input_ids is not None and input_ids.shape[0] > 1:
                # flash-attention reads position_ids as packed only for ONE row (`_is_packed_sequence`):
                # several rows would attend across samples. The collators already flatten; this keeps any
                # other caller right (right padding restarts at 0, so it is a segment of its own).
                input_ids, position_ids = input_ids.reshape(1, -1), position_ids.reshape(1, -1)
                labels = labels.reshape(1, -1) if labels is not None else None
        if self.visual_encoder is None:
            if pixel_values is not None:
                raise UserError("pixel_values given to a text-only model (no visual_encoder configured)")
            return self._llm_forward(labels, input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=position_ids, **kwargs)
        if pixel_values is None and not bool((input_ids == IMAGE_TOKEN_INDEX).any()):
            # Plain text through a LLaVA model (e.g. chat without an image): no splice needed.
            return self._llm_forward(labels, input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=position_ids, **kwargs)
        embeds, mask, new_labels, new_pos = self.prepare_inputs_embeds(
            input_ids, attention_mask, labels, pixel_values, padding_side="right", image_sizes=image_sizes,
            position_ids=position_ids if packed else None)
        return self._llm_forward(new_labels, inputs_embeds=embeds, attention_mask=mask, position_ids=new_pos,
                                 **kwargs)

    def _llm_forward(self, labels, **kwargs):
        """The LLM's forward. With labels, the loss is `llava_ft.model.lm_loss`'s: the decoder runs, then
        the head only at supervised positions, `loss_chunk_tokens` rows at a time, so no [B, T, vocab]
        logits exist (the output then has no logits). An architecture whose forward cannot be split keeps
        transformers' forward (said once), as does `loss_chunk_tokens` 0."""
        parts = None
        if labels is not None and self.loss_chunk_tokens:
            parts = lm_loss.llm_head_parts(self.llm)
            if parts is None and not self.__dict__.get("_said_unsplit"):
                self.__dict__["_said_unsplit"] = True
                print(f"llava_ft: loss from logits at every position (transformers' forward): "
                      f"{lm_loss.why_not_splittable(self.llm)}", flush=True)
        if parts is None:
            return self.llm(labels=labels, **kwargs)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        hidden = parts.backbone(**kwargs)
        loss = lm_loss.causal_lm_loss(parts, hidden, labels, num_items_in_batch, self.loss_chunk_tokens)
        return CausalLMOutputWithPast(loss=loss)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None,
                 **gen_kwargs) -> torch.Tensor:
        """Generate; returns ONLY the new tokens, shape [batch, new_len] (with or without images).

        Batched prompts must be left-padded (as for any decoder-only `generate`).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.long)
        if self.visual_encoder is None or (pixel_values is None and not bool((input_ids == IMAGE_TOKEN_INDEX).any())):
            if pixel_values is not None:
                raise UserError("pixel_values given to a text-only model (no visual_encoder configured)")
            out = self.llm.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
            return out[:, input_ids.shape[1]:]
        embeds, mask, _, _ = self.prepare_inputs_embeds(input_ids, attention_mask, None, pixel_values,
                                                        padding_side="left", image_sizes=image_sizes)
        # With inputs_embeds only, decoder-only generate returns just the generated ids.
        return self.llm.generate(inputs_embeds=embeds, attention_mask=mask, **gen_kwargs)
