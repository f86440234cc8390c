"""`llava_ft log-dataset CONFIG [--show text|masked_text|input_ids|labels|all] [-n N] [--json] [key=value ...]`.

Shows exactly what the model trains on: the same `prepare_dataset` call (same cache, packing and drops)
that `llava_ft train` makes. `text` decodes input_ids (`<image>` where an image's features go);
`masked_text` shows only the supervised tokens, with each unsupervised run written as `<masked N>`.
`--json` prints one object per sample: {"id", "input_ids", "labels"} with -100 for no loss and -200
where an image goes (plus `position_ids` for packed rows), for diffing against other tools.
"""
from __future__ import annotations

import argparse
import json
import sys

from llava_ft import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX

SHOW = ("text", "masked_text", "input_ids", "labels", "all")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML recipe path or built-in recipe name")
    # `CONFIG --work-dir D a.b=1` puts overrides after options; plain parse_args would reject them as
    # unrecognized (a positional nargs="*" is consumed once), so this parser parses intermixed args.
    parser.parse_args = parser.parse_intermixed_args
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for train")
    parser.add_argument("--show", choices=SHOW, default="all", help="what to print per sample (default: all)")
    parser.add_argument("-n", type=int, default=3, help="how many samples (default 3; 0 = all)")
    parser.add_argument("--json", action="store_true", help="one JSON object per sample: id, input_ids, labels")


def decode_ids(tokenizer, ids: list) -> str:
    """Decode, writing `<image>` for IMAGE_TOKEN_INDEX (the tokenizer cannot decode -200)."""
    out, run = [], []
    for tid in ids:
        if tid == IMAGE_TOKEN_INDEX:
            out.append(tokenizer.decode(run))
            out.append(IMAGE_TOKEN)
            run = []
        else:
            run.append(tid)
    out.append(tokenizer.decode(run))
    return "".join(out)


def masked_text(tokenizer, input_ids: list, labels: list) -> str:
    """Supervised tokens decoded; each run of -100 labels shown as `<masked N>`."""
    out, run, masked = [], [], 0
    for tid, lab in zip(input_ids, labels):
        if lab == IGNORE_INDEX:
            if run:
                out.append(decode_ids(tokenizer, run))
                run = []
            masked += 1
        else:
            if masked:
                out.append(f"<masked {masked}>")
                masked = 0
            run.append(lab)
    if run:
        out.append(decode_ids(tokenizer, run))
    if masked:
        out.append(f"<masked {masked}>")
    return "".join(out)


def load_prepared(cfg):
    """(tokenizer, PreparedData) exactly as training builds them (vision tower only for its token count)."""
    from llava_ft.data.dataset import prepare_dataset
    from llava_ft.model.llm import load_tokenizer

    num_image_tokens = 0
    if cfg.model.llava:  # a released LLaVA: its folder holds the tokenizer and the tower
        from llava_ft.model.anyres import image_token_counter
        from llava_ft.model.llava_hf_import import load_released_tokenizer_and_tower

        tokenizer, tower = load_released_tokenizer_and_tower(cfg)
        return tokenizer, prepare_dataset(cfg.data, tokenizer, num_image_tokens=image_token_counter(tower),
                                          seed=cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    if cfg.is_llava:
        from llava_ft.model.vision import load_visual_encoder

        from llava_ft.model.anyres import image_token_counter

        num_image_tokens = image_token_counter(load_visual_encoder(cfg.model))
    return tokenizer, prepare_dataset(cfg.data, tokenizer, num_image_tokens=num_image_tokens, seed=cfg.train.seed)


def run(args: argparse.Namespace) -> int:
    from llava_ft.config import load_config
    from llava_ft.engine.run import _print_data_stats

    cfg = load_config(args.config, overrides=args.overrides)
    tokenizer, prepared = load_prepared(cfg)
    dataset = prepared.dataset
    count = len(dataset) if args.n <= 0 else min(args.n, len(dataset))
    if not args.json:
        _print_data_stats(prepared.stats)
    for i in range(count):
        row = dataset[i]
        ids, labels = list(row["input_ids"]), list(row["labels"])
        if args.json:
            obj = {"id": row.get("id", str(i)), "input_ids": ids, "labels": labels}
            if "position_ids" in row:
                obj["position_ids"] = list(row["position_ids"])
            sys.stdout.write(json.dumps(obj) + "\n")
            continue
        print(f"===== sample {i} (id {row.get('id', i)}, {len(ids)} tokens) =====")
        if args.show in ("text", "all"):
            print(f"--- text ---\n{decode_ids(tokenizer, ids)}")
        if args.show in ("masked_text", "all"):
            print(f"--- masked_text ---\n{masked_text(tokenizer, ids, labels)}")
        if args.show in ("input_ids", "all"):
            print(f"--- input_ids ---\n{ids}")
        if args.show in ("labels", "all"):
            print(f"--- labels ---\n{labels}")
    sys.stdout.flush()
    return 0
