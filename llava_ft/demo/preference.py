"""The demo's preference stage (DPO after the LLaVA finetune) and how it is measured (`llava_ft demo`).

    files = write_demo_pairs(paths, out_dir)        # TRL-format pairs from the demo's synthetic images
    m = pair_metrics(chat_model, files["heldout"], paths["image_folder"])   # log-probs of held-out pairs
    reward_accuracy(policy_metrics, reference_metrics, beta)

Pairs: for every finetune image, "What colour is the shape?" with chosen = its colour and rejected = another
colour, and "What shape is it?" with chosen = its shape and rejected = a shape that is not there. The
held-out pairs are built the same way from the eval images (never trained on), one per eval question.

Measured before and after the stage, on held-out data only:
- reward accuracy: share of held-out pairs whose implicit DPO reward beta * (log pi - log pi_ref) is higher
  for the chosen answer (pi_ref = the finetuned model the stage starts from; it is 0 % before training,
  where every reward is 0); and the policy's own preference (log pi(chosen) > log pi(rejected));
- answers' accuracy: greedy answers to the held-out colour and shape questions (exact match), as the
  eval stages measure it.
"""
from __future__ import annotations

import random
from pathlib import Path

from llava_ft import fileio

COLOUR_QUESTION = "What colour is the shape?"
SHAPE_QUESTION = "What shape is it?"


def _facts(record: dict) -> tuple:
    """(colour, shape) of a demo finetune record, read from its answers."""
    from llava_ft.demo.assets import COLOURS, SHAPES

    colour = shape = None
    for turn in record["conversations"]:
        if turn["from"] != "gpt":
            continue
        words = turn["value"].rstrip(".").lower().split()
        colour = colour or next((w for w in words if w in COLOURS), None)
        shape = shape or next((w for w in words if w in SHAPES), None)
    return colour, shape


def _pair(rng: random.Random, pid: str, image: str, question: str, truth: str, options) -> dict:
    wrong = rng.choice([o for o in options if o != truth])
    return {"id": pid, "images": [image], "prompt": f"<image>\n{question}", "chosen": truth, "rejected": wrong}


def write_demo_pairs(paths: dict, out_dir, seed: int = 0) -> dict:
    """Write train and held-out pairs (TRL format, image paths relative to the image folder) -> their paths."""
    import json

    from llava_ft.demo.assets import COLOURS, SHAPES

    rng = random.Random(seed)
    out = Path(out_dir)
    train = []
    with open(paths["finetune"], encoding="utf-8") as fh:
        records = json.load(fh)
    for rec in records:
        colour, shape = _facts(rec)
        if colour:
            train.append(_pair(rng, f"{rec['id']}-colour", rec["image"], COLOUR_QUESTION, colour, list(COLOURS)))
        if shape:
            train.append(_pair(rng, f"{rec['id']}-shape", rec["image"], SHAPE_QUESTION, shape, SHAPES))
    heldout = []
    with open(paths["eval"], encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            options = list(COLOURS) if row["question"] == COLOUR_QUESTION else SHAPES
            heldout.append(_pair(rng, row["id"], row["image"], row["question"], row["answer"], options))
    files = {"train": str(out / "pairs_train.jsonl"), "heldout": str(out / "pairs_heldout.jsonl")}
    fileio.write_jsonl(files["train"], train)
    fileio.write_jsonl(files["heldout"], heldout)
    return dict(files, n_train=len(train), n_heldout=len(heldout))


def pair_metrics(chat_model, pairs_path: str, image_folder: str, batch_size: int = 16) -> dict:
    """Summed log-probs of each held-out pair's chosen and rejected answer under `chat_model`'s model,
    each pair's prompt and image run once (llava_ft.model.preference.sequence_logps)."""
    import torch

    from llava_ft.data.formats import iter_raw
    from llava_ft.data.preference import encode_pairs, to_pair
    from llava_ft.data.preference_collate import PreferenceCollator
    from llava_ft.model.preference import sequence_logps

    cm = chat_model
    pairs = [to_pair(row, "trl", where, image_folder) for where, row in iter_raw(pairs_path)]
    results = encode_pairs(pairs, cm.tokenizer, cm.template, cm.system, max_length=100_000,
                           num_image_tokens=cm.num_image_tokens)
    samples = []
    for pair, res in zip(pairs, results):
        sample = dict(res.sample)
        sample["pixel_values"] = torch.stack([cm.image_processor(cm.load_image(p)) for p in pair["images"]])
        samples.append(sample)
    collate = PreferenceCollator(pad_token_id=cm.tokenizer.pad_token_id,
                                 image_shape=tuple(samples[0]["pixel_values"].shape[1:]))
    chosen, rejected = [], []
    model = cm.model
    model.eval()
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = {k: v.to(cm.device) if hasattr(v, "to") else v
                     for k, v in collate(samples[start:start + batch_size]).items()}
            out = sequence_logps(model, batch)
            chosen += out.chosen.float().tolist()
            rejected += out.rejected.float().tolist()
    prefers = sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)
    return {"chosen_logps": chosen, "rejected_logps": rejected, "n": len(chosen), "prefers_chosen": prefers}


def reward_accuracy(policy: dict, reference: dict) -> float:
    """Share of pairs whose reward log pi - log pi_ref (beta > 0 scales both alike) is higher for the chosen
    answer; 0 when policy == reference (every reward 0: no pair counts as won)."""
    wins = [(pc - rc) > (pr - rr) for pc, rc, pr, rr in zip(policy["chosen_logps"], reference["chosen_logps"],
                                                          policy["rejected_logps"], reference["rejected_logps"])]
    return sum(wins) / len(wins)
