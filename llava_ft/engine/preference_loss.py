"""Preference losses (DPO family, ORPO, SimPO) on per-pair sequence log-probabilities.

    out = preference_loss(settings, policy, reference)   # settings: config.PreferenceConfig
    out.loss.backward(); out.metrics["rewards/accuracies"]

`policy` / `reference` are `SequenceLogps` (per pair: summed log p of the chosen / rejected answer's
supervised tokens, their token counts); `reference` is None for the reference-free losses (orpo, simpo).
The definitions follow TRL 1.16's DPOTrainer for sigmoid / hinge / ipo / robust (IPO length-normalises the
log-ratios by the answer's token count; robust is its label-smoothed form, unbiased by 1 - 2 eps) and
the papers for ORPO (Hong et al. 2024: NLL on chosen + beta * -log sigmoid(log odds ratio), on the
length-averaged log-probs) and SimPO (Meng et al. 2024: -log sigmoid(beta * (mean logp chosen - mean logp
rejected) - gamma)). `sft_weight` adds that weight times the chosen answers' token-mean NLL to any loss.
Written here (not imported from TRL) because TRL computes them on its own duplicated batch layout; the
tests check the numbers against TRL's trainer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from llava_ft.model.preference import SequenceLogps

REFERENCE_FREE = ("orpo", "simpo")


@dataclass
class PreferenceOutput:
    loss: torch.Tensor  # scalar: mean over the pairs of the batch (+ the SFT term)
    per_pair: torch.Tensor  # [pairs] preference loss of each pair, before the SFT term
    metrics: dict  # name -> float tensor [pairs] (averaged by the caller over the logging window)


def needs_reference(loss_type: str) -> bool:
    return loss_type not in REFERENCE_FREE


def _mean_logps(logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logps / tokens.clamp(min=1).to(logps.dtype)


def preference_loss(settings, policy: SequenceLogps, reference: Optional[SequenceLogps] = None) -> PreferenceOutput:
    kind = "sigmoid" if settings.loss == "dpo" else settings.loss
    beta = float(settings.beta)
    if kind in REFERENCE_FREE:
        chosen_mean = _mean_logps(policy.chosen, policy.chosen_tokens)
        rejected_mean = _mean_logps(policy.rejected, policy.rejected_tokens)
        if kind == "orpo":
            # log odds(y) = log p - log(1 - p), p = the length-averaged probability of the answer
            log_odds = (chosen_mean - rejected_mean) - (torch.log1p(-torch.exp(chosen_mean))
                                                        - torch.log1p(-torch.exp(rejected_mean)))
            nll = -chosen_mean  # ORPO's own SFT term (weight 1), per pair
            per_pair = nll - beta * F.logsigmoid(log_odds)
        else:  # simpo
            per_pair = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - float(settings.simpo_gamma))
        chosen_rewards, rejected_rewards = beta * chosen_mean.detach(), beta * rejected_mean.detach()
        logged_chosen, logged_rejected = chosen_mean.detach(), rejected_mean.detach()
    else:
        if reference is None:
            raise ValueError(f"loss {kind!r} needs reference log-probs")
        chosen_ratio = policy.chosen - reference.chosen.to(policy.chosen.dtype)
        rejected_ratio = policy.rejected - reference.rejected.to(policy.rejected.dtype)
        delta = chosen_ratio - rejected_ratio
        if kind == "sigmoid":
            per_pair = -F.logsigmoid(beta * delta)
        elif kind == "hinge":
            per_pair = torch.relu(1 - beta * delta)
        elif kind == "ipo":
            # IPO on per-token log-ratios: the squared loss would otherwise grow with the answer length
            ipo_delta = (_mean_logps(chosen_ratio, policy.chosen_tokens)
                         - _mean_logps(rejected_ratio, policy.rejected_tokens))
            per_pair = (ipo_delta - 1 / (2 * beta)) ** 2
        elif kind == "robust":
            eps = float(settings.label_smoothing)
            per_pair = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
        else:
            raise ValueError(f"unknown preference loss {kind!r}")
        chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
        logged_chosen, logged_rejected = policy.chosen.detach(), policy.rejected.detach()
    loss = per_pair.mean()
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": logged_chosen,
        "logps/rejected": logged_rejected,
    }
    if float(settings.sft_weight):
        # token-mean NLL over every chosen token of the batch (TRL's "sft" term; LLaVA-NeXT's dpo_alpha)
        sft = -policy.chosen.sum() / policy.chosen_tokens.sum().clamp(min=1).to(policy.chosen.dtype)
        loss = loss + float(settings.sft_weight) * sft
        metrics["sft_loss"] = sft.detach().expand(per_pair.shape[0])
    return PreferenceOutput(loss=loss, per_pair=per_pair, metrics=metrics)
