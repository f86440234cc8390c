"""Preference pairs (llava_ft.data.preference, preference_dataset): the real formats' shapes detected and
normalized, prompt tokens equal to SFT's (tiny BPE and InternLM2's real tokenizer against XTuner's rule),
the truncation rule, bad pairs listed with file/line/id or skipped and counted, json/jsonl/parquet/
save_to_disk sources with images inside, and the dataset's columns and cache."""
from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import pytest
from PIL import Image
from transformers import AutoTokenizer

from llava_ft import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_ft.config import Config, DataConfig, DataSource, PreferenceConfig
from llava_ft.data.encode import encode_prompt, encode_record
from llava_ft.data.formats import RecordError
from llava_ft.data.preference import detect_pair_format, encode_pair, to_pair
from llava_ft.data.preference_dataset import build_preference_dataset, source_pair_format
from llava_ft.errors import UserError

N_IMG = 16

# The shapes each tool documents (TRL "dataset formats", XTuner docs/en/reward_model/preference_data.md and
# orpo_dpo_mix_40k_map_fn, RLAIF-V-Dataset's card, LLaMA-Factory data/README ranking sharegpt / alpaca).
SHAPES = {
    "trl_standard": ({"prompt": "What colour is the sky?", "chosen": "Blue.", "rejected": "Green."}, "trl",
                     [{"role": "user", "content": "What colour is the sky?"}], "Blue.", "Green.", 0),
    "trl_conversational_vision": ({
        "images": ["a.png"],
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]}, "trl",
        [{"role": "user", "content": "<image>\nWhat colour?"}], "Red.", "Blue.", 1),
    "trl_implicit_prompt": ({
        "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}],
        "images": ["a.png", "b.png"]}, "trl",
        [{"role": "user", "content": "<image>\n<image>\nHi"}], "Hello!", "Go away.", 2),
    "xtuner": ({
        "prompt": [{"role": "system", "content": "You are a helpful assistant."},
                   {"role": "user", "content": "Who won the world series in 2020?"},
                   {"role": "assistant", "content": "The Los Angeles Dodgers."},
                   {"role": "user", "content": "Where was it played?"}],
        "chosen": [{"role": "assistant", "content": "Globe Life Field."}],
        "rejected": [{"role": "assistant", "content": "I don't know."}]}, "xtuner",
        [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "Who won the world series in 2020?"},
         {"role": "assistant", "content": "The Los Angeles Dodgers."},
         {"role": "user", "content": "Where was it played?"}], "Globe Life Field.", "I don't know.", 0),
    "orpo_dpo_mix_40k": ({
        "source": "capybara", "prompt": "Explain DPO", "question": "Explain DPO",
        "chosen": [{"content": "Explain DPO", "role": "user"}, {"content": "A preference loss.", "role": "assistant"}],
        "rejected": [{"content": "Explain DPO", "role": "user"}, {"content": "No idea.", "role": "assistant"}]},
        "xtuner", [{"role": "user", "content": "Explain DPO"}], "A preference loss.", "No idea.", 0),
    "rlaif_v": ({"ds_name": "RLAIF-V", "image": "a.png", "question": "Describe the image.",
                 "chosen": "A red circle.", "rejected": "A blue square.", "origin_dataset": "x",
                 "origin_split": "{}", "idx": "OmniLMM-12B_7", "image_path": "a.png"}, "rlaif_v",
                [{"role": "user", "content": "<image>\nDescribe the image."}], "A red circle.", "A blue square.", 1),
    "sharegpt_pairwise": ({
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                          {"from": "human", "value": "What is in it? <image>"}],
        "chosen": {"from": "gpt", "value": "A circle."}, "rejected": {"from": "gpt", "value": "A cat."},
        "system": "Be brief.", "images": ["a.png"]}, "sharegpt_pairwise",
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "<image>\nWhat is in it?"}],
        "A circle.", "A cat.", 1),
    "alpaca_pairwise": ({"instruction": "What is AI?", "input": "", "chosen": "Artificial intelligence.",
                         "rejected": "I don't know."}, "alpaca_pairwise",
                        [{"role": "user", "content": "What is AI?\n"}], "Artificial intelligence.", "I don't know.", 0),
}


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return AutoTokenizer.from_pretrained(tiny_tokenizer)


@pytest.mark.parametrize("name", list(SHAPES))
def test_each_format_is_detected_and_normalized(name, tmp_path):
    row, fmt, messages, chosen, rejected, n_images = SHAPES[name]
    assert detect_pair_format(row, "f.jsonl:1") == fmt
    pair = to_pair(row, fmt, "f.jsonl:1", image_folder=str(tmp_path))
    assert [{"role": m["role"], "content": m["content"]} for m in pair["messages"]] == messages
    assert (pair["chosen"], pair["rejected"]) == (chosen, rejected)
    assert pair["images"] == [str(tmp_path / f) for f in ("a.png", "b.png")[:n_images]]
    assert not any(m["loss"] for m in pair["messages"])  # nothing of the prompt is supervised
    if name == "rlaif_v":
        assert pair["id"] == "OmniLMM-12B_7"


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "q", "chosen": "same", "rejected": " same "}, "identical_answers"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "empty_answer"),
    ({"prompt": "<image> q", "chosen": "a", "rejected": "b"}, "image_marker_mismatch"),
    ({"prompt": "<image> q", "chosen": "a", "rejected": "b", "images": ["1.png", "2.png"]}, "image_marker_mismatch"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}], "chosen": "a",
      "rejected": "b"}, "prompt_not_user_last"),
    ({"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]}, "prompt_mismatch"),
])
def test_bad_pairs_have_a_reason_and_name_the_line(row, reason):
    with pytest.raises(RecordError, match="f.jsonl:3") as err:
        to_pair(row, detect_pair_format(row), "f.jsonl:3")
    assert err.value.reason == reason


def test_not_a_pair_is_a_user_error():
    with pytest.raises(UserError, match="not a preference pair"):
        detect_pair_format({"messages": []}, "f.jsonl:1")


@pytest.mark.parametrize("template", ["qwen_chat", "hf", "internlm2_chat", "llama2_chat", "vicuna", "default"])
@pytest.mark.parametrize("name", ["xtuner", "sharegpt_pairwise", "trl_implicit_prompt"])
def test_prompt_and_answer_tokens_are_sfts(template, name, tok):
    row, fmt = SHAPES[name][:2]
    pair = to_pair(row, fmt, "f:1", image_folder="/img")
    sample = encode_pair(pair, tok, template, max_length=4096, num_image_tokens=N_IMG)
    assert sample["prompt_ids"] == encode_prompt(pair["messages"], tok, template, images=pair["images"])
    assert sample["num_images"] == len(pair["images"]) == sample["prompt_ids"].count(IMAGE_TOKEN_INDEX)
    for key in ("chosen", "rejected"):
        # SFT's sample of the same conversation ending with this answer: the same ids, and the answer's
        # labels exactly as SFT supervises them (text + SUFFIX (+ EOS); SEP not).
        sft = encode_record({"id": "x", "images": pair["images"], "messages": [
            dict(m, loss=False) for m in pair["messages"]] + [{"role": "assistant", "content": pair[key]}]},
            tok, template, 4096, num_image_tokens=N_IMG).sample
        n = len(sample["prompt_ids"])
        assert sft["input_ids"] == sample["prompt_ids"] + sample[f"{key}_ids"]
        assert sft["labels"][n:] == sample[f"{key}_labels"]
        assert sft["labels"][:n] == [IGNORE_INDEX] * n
    positions = len(sample["prompt_ids"]) + sample["num_images"] * (N_IMG - 1)
    assert sample["prompt_length"] == positions
    assert sample["length"] == positions + len(sample["chosen_ids"]) + len(sample["rejected_ids"])
    assert sample["modality_length"] == (sample["length"] if pair["images"] else -sample["length"])


def test_truncation_prompt_from_the_left_answers_from_the_right(tok):
    long_prompt = " ".join(f"word{i}" for i in range(200))
    pair = to_pair({"prompt": long_prompt + " last question?", "chosen": "yes " * 80, "rejected": "no"}, "trl", "f:1")
    full = encode_pair(pair, tok, "qwen_chat", max_length=100_000)
    sample = encode_pair(pair, tok, "qwen_chat", max_length=120, max_prompt_length=50)
    assert len(sample["prompt_ids"]) == 50
    assert sample["prompt_ids"][0] == tok.bos_token_id  # BOS kept at the start
    assert sample["prompt_ids"][1:] == full["prompt_ids"][-49:]  # the end of the prompt kept
    budget = 120 - 50
    assert sample["chosen_ids"] == full["chosen_ids"][:budget]  # answers keep their start
    assert sample["rejected_ids"] == full["rejected_ids"]  # the short one is whole
    assert len(sample["prompt_ids"]) + max(len(sample["chosen_ids"]), len(sample["rejected_ids"])) <= 120
    assert encode_pair(pair, tok, "qwen_chat", max_length=64)["prompt_ids"].__len__() == 32  # default: max_length // 2


def test_truncation_never_cuts_an_image(tok):
    text = " ".join(f"w{i}" for i in range(40))
    pair = to_pair({"prompt": [{"role": "user", "content": [{"type": "text", "text": text}]}],
                    "chosen": "a", "rejected": "b", "images": ["x.png"]}, "trl", "f:1", image_folder="/img")
    # the image marker moved first (images without markers go to the start), so cutting the text on its left
    # would remove the image: the pair is dropped, not cut inside the features
    assert encode_pair(pair, tok, "qwen_chat", max_length=200, max_prompt_length=40, num_image_tokens=N_IMG) == (
        None, "prompt_too_long_with_images")
    kept = encode_pair(pair, tok, "qwen_chat", max_length=400, max_prompt_length=200, num_image_tokens=N_IMG)
    assert kept["prompt_ids"].count(IMAGE_TOKEN_INDEX) == 1
    with pytest.raises(UserError, match="max_prompt_length"):
        encode_pair(pair, tok, "qwen_chat", max_length=100, max_prompt_length=100)


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def _cfg(tmp_path, *paths, skip=False, **kw) -> Config:
    return Config(data=DataConfig(sources=[DataSource(path=str(p), **kw) for p in paths], template="qwen_chat",
                                  max_length=256, skip_bad_samples=skip, cache_dir=str(tmp_path / "cache")),
                  preference=PreferenceConfig(loss="sigmoid", max_prompt_length=128))


@pytest.fixture()
def pair_files(tmp_path):
    """A TRL jsonl with path images and bad lines, and an RLAIF-V parquet with the images inside."""
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
    lines = [json.dumps({"prompt": "What colour?", "chosen": "red", "rejected": "blue", "images": ["red.png"]}),
             json.dumps({"id": "same", "prompt": "What colour?", "chosen": "red", "rejected": "red"}),
             json.dumps({"id": "lost", "prompt": "What colour?", "chosen": "red", "rejected": "blue",
                         "images": ["missing.png"]}),
             "{not json",
             json.dumps({"id": "marks", "prompt": "<image><image> two?", "chosen": "a", "rejected": "b",
                         "images": ["red.png"]})]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    rlaif = datasets.Dataset.from_dict({
        "ds_name": ["RLAIF-V"] * 3, "image": [{"bytes": _png(c), "path": None} for c in ("red", "green", "blue")],
        "question": ["Colour?", "Colour?", "Shape?"], "chosen": ["red", "green", "circle"],
        "rejected": ["blue", "red", "square"], "idx": ["r0", "r1", "r2"]}).cast_column("image", datasets.Image())
    rlaif.to_parquet(str(tmp_path / "rlaif.parquet"))
    rlaif.save_to_disk(str(tmp_path / "rlaif_saved"))
    return tmp_path


def test_bad_pairs_listed_with_file_line_and_id(pair_files, tok):
    with pytest.raises(UserError) as err:
        build_preference_dataset(_cfg(pair_files, pair_files / "pairs.jsonl"), tok, N_IMG)
    text = str(err.value)
    assert "4 bad pair(s)" in text and "data.skip_bad_samples" in text
    for needle in ("pairs.jsonl:2: pair same: chosen and rejected are the same", "pairs.jsonl:3: pair lost: image "
                   "file not found", "pairs.jsonl:4: not valid JSON", "pairs.jsonl:5: pair marks: 2 '<image>'"):
        assert needle in text, needle


def test_skip_bad_samples_counts_them(pair_files, tok):
    cfg = _cfg(pair_files, pair_files / "pairs.jsonl", pair_files / "rlaif.parquet", skip=True)
    prepared = build_preference_dataset(cfg, tok, N_IMG)
    assert prepared.stats["skipped"] == {"identical_answers": 1, "missing_image": 1, "invalid_json": 1,
                                         "image_marker_mismatch": 1}
    assert prepared.stats["records"] == 8 and prepared.stats["pairs"] == 4
    ds = prepared.dataset
    assert ds["id"][1:] == ["r0", "r1", "r2"]
    assert ds["id"][0].endswith("pairs.jsonl:1")
    assert ds["num_images"] == [1, 1, 1, 1] and all(m > 0 for m in ds["modality_length"])
    assert ds["image_bytes"][0] == [b""] and ds["images"][0] == [str(pair_files / "red.png")]
    assert all(b[0].startswith(b"\x89PNG") for b in ds["image_bytes"][1:])  # images inside stay bytes
    again = build_preference_dataset(cfg, tok, N_IMG)
    assert again.stats["cache_hit"] and again.dataset["prompt_ids"] == ds["prompt_ids"]


def test_image_check_of_pairs_is_remembered_over_all_sources(pair_files, tok, monkeypatch):
    """Two pair files with image paths: the first build reads every image file, a rebuild (tokenized cache
    missed) none of them, and a file broken since is found again."""
    import llava_ft.data.images as images

    Image.new("RGB", (8, 8), (0, 255, 0)).save(pair_files / "green.png")
    for name, colour in (("a.jsonl", "red"), ("b.jsonl", "green")):
        (pair_files / name).write_text(json.dumps({"prompt": "Colour?", "chosen": colour, "rejected": "blue",
                                                   "images": [f"{colour}.png"]}) + "\n")
    cfg = _cfg(pair_files, pair_files / "a.jsonl", pair_files / "b.jsonl", image_folder=str(pair_files))
    files_read: list = []
    real_check = images.check_image

    def counting(source):  # the real check; file paths counted (bytes inside a dataset are always checked)
        if isinstance(source, str):
            files_read.append(Path(source).name)
        return real_check(source)

    monkeypatch.setattr(images, "check_image", counting)

    def build():
        files_read.clear()
        build_preference_dataset(cfg, tok, N_IMG, use_cache=False, check_images=True)
        return sorted(files_read)

    assert build() == ["green.png", "red.png"]
    assert build() == []
    (pair_files / "green.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="green.png"):
        build()


@pytest.mark.parametrize("name", ["rlaif.parquet", "rlaif_saved"])
def test_dataset_sources_with_images_inside(name, pair_files, tok, capsys):
    src = DataSource(path=str(pair_files / name))
    assert source_pair_format(src) == "rlaif_v"
    ds = build_preference_dataset(_cfg(pair_files, pair_files / name), tok, N_IMG, use_cache=False).dataset
    assert "format auto -> rlaif_v" in capsys.readouterr().out
    pair = to_pair({"image": "x.png", "question": "Colour?", "chosen": "red", "rejected": "blue"}, "rlaif_v", "x",
                   image_folder="/img")
    want = encode_pair(pair, tok, "qwen_chat", max_length=256, max_prompt_length=128, num_image_tokens=N_IMG)
    for key in ("prompt_ids", "chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels", "length"):
        assert ds[0][key] == want[key], key


def test_text_pairs_from_json_list_are_negative_length(tmp_path, tok):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([SHAPES["xtuner"][0], SHAPES["orpo_dpo_mix_40k"][0]]))
    ds = build_preference_dataset(_cfg(tmp_path, path), tok, N_IMG, use_cache=False).dataset
    assert ds["num_images"] == [0, 0] and all(m < 0 for m in ds["modality_length"])
    assert [-m for m in ds["modality_length"]] == ds["length"]
    assert source_pair_format(DataSource(path=str(path))) == "xtuner"
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    assert source_pair_format(DataSource(path=str(sft))) is None


def test_internlm2_prompt_tokens_equal_xtuners(tmp_path_factory):
    """InternLM2's real (converted sentencepiece) tokenizer: the prompt ids of a pair are XTuner's ids of the
    same conversation up to the answer, and prompt + chosen is XTuner's whole sample."""
    import test_internlm2_tokenizer as test_tok  # its XTuner reference (pytest puts tests/ on sys.path)

    from llava_ft.model.internlm2_tokenizer import load_internlm2_tokenizer, native_conversion_supported
    from llava_ft.templates import get_template
    from llava_ft.testing.internlm2_tokenizer import build_internlm2_tokenizer

    if not native_conversion_supported():
        pytest.skip("native InternLM2 tokenizer conversion needs transformers >= 5.24")
    folder = build_internlm2_tokenizer(tmp_path_factory.mktemp("internlm2") / "tok")
    tok = load_internlm2_tokenizer(folder)
    ref = test_tok.Reference(folder)
    system = "你是书生·浦语。"
    row = {"prompt": [{"role": "system", "content": system}, {"role": "user", "content": "你好！Who are you?"},
                      {"role": "assistant", "content": "我是书生·浦语。"}, {"role": "user", "content": " 1+1=? "}],
           "chosen": [{"role": "assistant", "content": "2 😀\n"}], "rejected": [{"role": "assistant", "content": "3"}]}
    sample = encode_pair(to_pair(row, "xtuner", "f:1"), tok, "internlm2_chat", max_length=4096)
    turns = [{"input": "你好！Who are you?", "output": "我是书生·浦语。"}, {"input": " 1+1=? ", "output": "2 😀\n"}]
    want_ids, want_labels = test_tok.xtuner_encode(ref, turns, get_template("internlm2_chat"), system)
    n = len(sample["prompt_ids"])
    assert sample["prompt_ids"] + sample["chosen_ids"] == want_ids
    assert sample["chosen_labels"] == want_labels[n:]


def test_data_check_and_stats_understand_pair_files(pair_files, tiny_tokenizer, capsys):
    from llava_ft.cli import main

    data = str(pair_files / "pairs.jsonl")
    report = pair_files / "r.json"
    code = main(["data", "check", "--data", data, "--tokenizer", tiny_tokenizer, "--template", "qwen_chat",
                 "--max-length", "64", "--num-image-tokens", "40", "--report", str(report)])
    out = capsys.readouterr().out
    assert code == 1
    problems = {(p["kind"], p["line"], p["id"]) for p in json.loads(report.read_text())["problems"]}
    assert {("identical_answers", 2, "same"), ("missing_image", 3, "lost"), ("invalid_json", 4, None),
            ("image_count_mismatch", 5, "marks")} <= problems
    # line 1: 40 image positions + the prompt > max_prompt_length 32, an image cannot be cut: dropped
    assert ("dropped", 1, None) in problems and "cannot be cut from the left" in out
    assert "checked 4 record(s)" in out
    assert main(["data", "check", "--data", str(pair_files / "rlaif.parquet"), "--report", str(report)]) == 0

    code = main(["data", "stats", "--data", str(pair_files / "rlaif.parquet"), "--tokenizer", tiny_tokenizer,
                 "--template", "qwen_chat", "--num-image-tokens", str(N_IMG), "--json", str(report),
                 "--plot", str(pair_files / "h.png")])
    out = capsys.readouterr().out
    assert code == 0 and "preference pairs: 3" in out and "pair chosen" in out
    figures = json.loads(report.read_text())
    assert figures["pairs"] == 3 and figures["with_images"] == 3 and figures["images"] == 3
    ds = build_preference_dataset(_cfg(pair_files, pair_files / "rlaif.parquet"), tiny_tokenizer and
                                  AutoTokenizer.from_pretrained(tiny_tokenizer), N_IMG, use_cache=False).dataset
    assert figures["full_length"]["p100"] == max(ds["length"])
    assert figures["prompt_length"]["p100"] == max(ds["prompt_length"])


def test_demo_pairs_are_right_against_wrong_answers(demo_data, tmp_path, tok):
    from llava_ft.demo.preference import write_demo_pairs
    from llava_ft.demo.assets import COLOURS, SHAPES

    files = write_demo_pairs(demo_data, tmp_path)
    rows = [json.loads(line) for line in open(files["train"])]
    assert len(rows) == files["n_train"] > len(json.load(open(demo_data["finetune"])))  # colour and shape pairs
    finetune = {r["id"]: r for r in json.load(open(demo_data["finetune"]))}
    for row in rows:
        record = finetune[row["id"].rsplit("-", 1)[0]]
        answers = " ".join(t["value"] for t in record["conversations"] if t["from"] == "gpt")
        options = COLOURS if row["id"].endswith("-colour") else SHAPES
        assert row["chosen"] in answers and row["rejected"] in options and row["rejected"] not in answers
        assert row["images"] == [record["image"]]
    heldout = [json.loads(line) for line in open(files["heldout"])]
    assert [r["chosen"] for r in heldout] == [json.loads(line)["answer"] for line in open(demo_data["eval"])]
    cfg = _cfg(tmp_path, files["train"], image_folder=demo_data["image_folder"])
    ds = build_preference_dataset(cfg, tok, N_IMG, use_cache=False).dataset
    assert len(ds) == len(rows) and set(ds["num_images"]) == {1}
