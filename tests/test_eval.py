"""`llava_ft eval`: accuracy on QA sets whose expected answers are built from the model's own greedy answers,
so the right score is known exactly; MMBench TSV multiple choice; bad rows name file and line."""
from __future__ import annotations

import base64
import io
import json
import random
import subprocess
import sys

import pytest

from llava_ft.demo.assets import draw_shape
from llava_ft.errors import UserError
from llava_ft.inference import GenerationSettings, load_chat_model
from llava_ft.inference.evaluate import evaluate, extract_choice, load_qa, normalize
from llava_ft.testing.checkpoints import write_random_checkpoint

MAX_NEW = 6


@pytest.fixture(scope="module")
def run_pth(tmp_path_factory, tiny_llama, tiny_clip):
    raw = {"model": {"llm": tiny_llama, "visual_encoder": tiny_clip, "freeze_llm": True},
           "data": {"template": "chatml", "sources": [{"path": "unused.json"}]}}
    return write_random_checkpoint(tmp_path_factory.mktemp("eval_run"), raw)


def test_normalize_and_choice():
    assert normalize("  The Red, circle! ") == "red circle"
    assert extract_choice("(B) because") == "B" and extract_choice("Answer: C.") == "C"
    assert extract_choice("no letter here") is None


def test_eval_accuracy_is_the_known_fraction(run_pth, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = random.Random(0)
    rows = []
    for i in range(6):
        draw_shape(["red", "blue", "green"][i % 3], "circle", rng, 48).save(folder / f"{i}.png")
        rows.append({"id": f"q{i}", "image": f"{i}.png", "question": f"What is in picture {i}?"})
    cm = load_chat_model(run_pth)
    greedy = GenerationSettings(max_new_tokens=MAX_NEW, temperature=0.0)
    answers = [cm.chat([{"role": "user", "content": r["question"]}], [str(folder / r["image"])], greedy).text
               for r in rows]
    # 3 of 6 exact (up to case/punctuation), 1 more only contained, 2 wrong
    for i, (row, ans) in enumerate(zip(rows, answers)):
        assert normalize(ans), "the tiny model must answer something for this test to mean anything"
        if i < 3:
            row["answer"] = ans.upper() + "!"
        elif i == 3:
            row["answer"] = normalize(ans).split()[0]
            assert normalize(row["answer"]) != normalize(ans)
        else:
            row["answer"] = "zzqx nothing like it"
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "preds.jsonl"
    proc = subprocess.run([sys.executable, "-m", "llava_ft", "eval", run_pth, "--data", str(data), "--image-folder",
                           str(folder), "--batch-size", "4", "--max-new-tokens", str(MAX_NEW), "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics == {"n": 6, "exact_match": 0.5, "contains": 4 / 6}
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["prediction"] for p in preds] == answers  # batched (left-padded) == one at a time
    assert json.loads((tmp_path / "preds.jsonl.metrics.json").read_text()) == metrics


def test_mmbench_tsv_multiple_choice(run_pth, tmp_path):
    buf = io.BytesIO()
    draw_shape("red", "square", random.Random(2), 48).save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\timage\n"
    tsv = tmp_path / "mmb.tsv"
    tsv.write_text(header + f"0\tWhat colour?\tnan\tred\tblue\tgreen\tyellow\tA\t{b64}\n"
                   + f"1\tWhich shape?\tLook closely.\tcircle\tsquare\tnan\tnan\tB\t{b64}\n")
    items = load_qa(tsv)
    assert items[0].choices == {"A": "red", "B": "blue", "C": "green", "D": "yellow"}
    assert "Look closely.\nWhich shape?\nA. circle\nB. square\n" in items[1].question
    cm = load_chat_model(run_pth)
    report = evaluate(cm, items, GenerationSettings(max_new_tokens=MAX_NEW, temperature=0.0), batch_size=2)
    picks = [extract_choice(p["prediction"], tuple(it.choices)) for p, it in zip(report.predictions, items)]
    expected = sum(pick == it.answer for pick, it in zip(picks, items)) / 2
    assert report.metrics["choice_accuracy"] == expected
    assert [p["choice"] for p in report.predictions] == picks


def test_bad_rows_name_file_and_line(tmp_path):
    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "no answer"}\n')
    with pytest.raises(UserError, match=r"qa.jsonl:2: missing key\(s\) answer"):
        load_qa(bad)
    bad.write_text('{"question": "q", "answer": "a"}\nnot json\n')
    with pytest.raises(UserError, match="qa.jsonl:2: not valid JSON"):
        load_qa(bad)


def test_short_context_caps_answers_and_names_a_question_that_does_not_fit(tiny_llama, tmp_path):
    """On a 64-token model, --max-new-tokens past the context is capped per question; a question that alone fills
    the context is a one-line error naming its id and both numbers."""
    from llava_ft.testing.variants import with_context

    cm = load_chat_model(with_context(tiny_llama, tmp_path / "short", 64), prompt_template="chatml")
    items = load_qa(_write_qa(tmp_path / "qa.jsonl", [{"id": "a", "question": "Count to ten.", "answer": "x"},
                                                        {"id": "b", "question": "Hi", "answer": "y"}]))
    report = evaluate(cm, items, GenerationSettings(max_new_tokens=500, temperature=0.0), batch_size=2)
    for it, pred in zip(items, report.predictions):
        room = 64 - cm.encode([{"role": "user", "content": it.question}]).length
        assert pred["prediction"] == cm.chat([{"role": "user", "content": it.question}], settings=GenerationSettings(
            max_new_tokens=room, temperature=0.0)).text
    long = load_qa(_write_qa(tmp_path / "long.jsonl", [{"id": "ok", "question": "Hi", "answer": "y"},
                                                       {"id": "too-long", "question": "circle " * 80, "answer": "z"}]))
    with pytest.raises(UserError, match=r"question too-long: the prompt is \d+ tokens, and the model's context is "
                                        r"64 tokens.*shorten that question"):
        evaluate(cm, long, GenerationSettings(max_new_tokens=8, temperature=0.0))


def _write_qa(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
