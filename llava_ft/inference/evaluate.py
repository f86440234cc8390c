"""Batch evaluation of a ChatModel on a QA set (`llava_ft eval`).

    items = load_qa("eval.jsonl", image_folder="images/")     # or an MMBench-style .tsv
    report = evaluate(chat_model, items, GenerationSettings(max_new_tokens=32), batch_size=8)
    report.metrics   # {"n": 15, "exact_match": 0.4, "contains": 0.6}  (+ "choice_accuracy" for MC)
    write_predictions(report.predictions, "preds.jsonl")

QA rows (JSONL or a JSON list): `{"id", "question", "answer", "image"?: path relative to --image-folder, "images"?: [...]}`,
and for LLaVA-OneVision runs/exports `"video"?: "clip.mp4"` (or `"videos"`), marked `<video>` in the question.
MMBench TSV: columns `index, question, A, B, C, D, answer` (+ optional `hint`, base64 `image`); the
prompt lists the options and asks for the letter; the score is the first option letter in the answer.
Exact match compares after normalisation (lowercase, no punctuation/articles, single spaces); "contains"
counts answers whose normalised text contains the normalised expected answer.
"""
from __future__ import annotations

import base64
import csv
import io
import os
import re
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from llava_ft.data.images import normalize_image
from llava_ft.data.jsonio import decode_utf8, iter_raw
from llava_ft.errors import UserError
from llava_ft.fileio import write_jsonl

OPTIONS = ("A", "B", "C", "D")
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclass
class QAItem:
    id: str
    question: str
    answer: str
    images: list = field(default_factory=list)  # paths or PIL images
    choices: Optional[dict] = None  # MMBench: letter -> option text


@dataclass
class EvalReport:
    metrics: dict
    predictions: list  # dicts: id, question, answer, prediction, exact_match, contains (+ choice)


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(" " if ch in string.punctuation else ch for ch in text)
    words = [w for w in text.split() if w not in ("a", "an", "the")]
    return " ".join(words)


def extract_choice(text: str, letters=OPTIONS) -> Optional[str]:
    """The option letter an answer gives: a leading 'B', 'B.', '(B)', 'Answer: B'; else the first standalone letter."""
    m = re.search(r"\b([A-D])\b", text.strip())
    return m.group(1) if m and m.group(1) in letters else None


def load_qa(path, image_folder=None) -> list:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--data {path}: no such file")
    if p.suffix.lower() == ".tsv":
        return _load_mmbench(p)
    items = []
    for rec in iter_raw(p):  # JSONL or a JSON list, streamed; bad JSON names the line
        row, lineno = rec.value, rec.line
        if not isinstance(row, dict):
            raise UserError(f"{p}:{lineno}: expected a JSON object with question and answer, got {type(row).__name__}")
        missing = [k for k in ("question", "answer") if k not in row]
        if missing:
            raise UserError(f"{p}:{lineno}: missing key(s) {', '.join(missing)}; each row needs question and answer")
        images = row.get("images") or ([row["image"]] if row.get("image") else [])
        # OneVision: a clip under LLaVA-NeXT's "video" key (or "videos"), after the images; `<video>` places it.
        images = list(images) + (row.get("videos") or ([row["video"]] if row.get("video") else []))
        images = [str(Path(image_folder) / im) if image_folder and not os.path.isabs(im) else im for im in images]
        items.append(QAItem(str(row.get("id", lineno)), str(row["question"]), str(row["answer"]), images))
    if not items:
        raise UserError(f"{p}: no questions in the file")
    return items


def _load_mmbench(p: Path) -> list:
    from PIL import Image

    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    text = decode_utf8(p.read_bytes(), p)  # a non-UTF-8 byte: file, line and byte offset, no traceback
    rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t"))
    items = []
    for lineno, row in enumerate(rows, 2):
        missing = [k for k in ("question", "answer", "A", "B") if not row.get(k)]
        if missing:
            raise UserError(f"{p}:{lineno}: missing column value(s) {', '.join(missing)} (MMBench TSV needs "
                            "index, question, A, B[, C, D], answer, image)")
        choices = {k: row[k] for k in OPTIONS if row.get(k) and row[k].lower() != "nan"}
        hint = row.get("hint") or ""
        question = (hint + "\n" if hint and hint.lower() != "nan" else "") + row["question"]
        question += "".join(f"\n{k}. {v}" for k, v in choices.items()) + "\n" + MC_INSTRUCTION
        images = []
        if row.get("image"):
            try:
                img = Image.open(io.BytesIO(base64.b64decode(row["image"])))
                img.load()
                # Converted like a training image (EXIF, transparency on white, 16-bit grey), not .convert("RGB")
                images = [normalize_image(img)]
            except Exception as err:  # bad base64 or not an image
                raise UserError(f"{p}:{lineno}: the image column is not a base64 image ({err})") from None
        items.append(QAItem(str(row.get("index", lineno)), question, row["answer"].strip(), images, choices))
    if not items:
        raise UserError(f"{p}: no questions in the file")
    return items


def evaluate(chat_model, items: list, settings, batch_size: int = 8) -> EvalReport:
    """Answer every item (left-padded batches) and score them."""
    from llava_ft.inference.chat_model import ContextLengthError

    convs = [([{"role": "user", "content": it.question}], it.images) for it in items]
    try:
        results = chat_model.generate_batch(convs, settings, batch_size=batch_size)
    except ContextLengthError as err:
        item = items[err.index or 0]
        raise UserError(f"question {item.id}: {err.summary}; shorten that question or remove it from --data"
                        ) from None
    preds = []
    em = contains = choice_hits = n_choice = 0
    for it, res in zip(items, results):
        pred, gold = normalize(res.text), normalize(it.answer)
        row = {"id": it.id, "question": it.question, "answer": it.answer, "prediction": res.text,
               "exact_match": pred == gold, "contains": bool(gold) and gold in pred}
        em += row["exact_match"]
        contains += row["contains"]
        if it.choices is not None:
            n_choice += 1
            row["choice"] = extract_choice(res.text, tuple(it.choices))
            row["correct"] = row["choice"] == it.answer.upper()
            choice_hits += row["correct"]
        preds.append(row)
    n = len(items)
    metrics = {"n": n, "exact_match": em / n, "contains": contains / n}
    if n_choice:
        metrics["choice_accuracy"] = choice_hits / n_choice
    return EvalReport(metrics, preds)


def write_predictions(predictions: list, path) -> None:
    """One JSON object per line, written atomically."""
    write_jsonl(path, predictions)
