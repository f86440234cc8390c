"""Reading every supported data format and file type into canonical records; errors name file and line."""
import json
import os

import datasets
import pytest

from llava_ft.config import DataSource
from llava_ft.data.formats import iter_records
from llava_ft.errors import UserError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def records(path, fmt="auto", image_folder=None):
    return list(iter_records(DataSource(path=str(path), format=fmt, image_folder=image_folder)))


def test_openai_messages_with_loss_flag(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A", "loss": False}, {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"}]}])
    (rec,) = records(p)
    assert rec["id"] == f"{p}:1"
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["loss"] for m in rec["messages"] if m["role"] == "assistant"] == [False, True]


def test_alpaca_follows_xtuner(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Do", "input": "this", "output": "ok"},
                                           {"instruction": "Do", "input": "", "output": "ok"},
                                           {"instruction": "x", "input": "", "output": "<nooutput>"}])
    recs = records(p)
    assert recs[0]["messages"][0]["content"] == "Do\nthis"
    assert recs[1]["messages"][0]["content"] == "Do\n"  # XTuner always joins with '\n'
    assert recs[2]["messages"] == []  # '<nooutput>' records are empty -> dropped at encode time


def test_llava_images_resolved_and_marker_moved(tmp_path):
    rows = [{"id": "s1", "image": "cats/1.png", "conversations": [
        {"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A cat."}]},
        {"id": "s2", "image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image> and <image> compare"}, {"from": "gpt", "value": "Same."}]}]
    p = tmp_path / "llava.json"
    p.write_text(json.dumps(rows))
    recs = records(p, image_folder=str(tmp_path / "imgs"))
    assert recs[0]["id"] == "s1"
    assert recs[0]["images"] == [os.path.join(str(tmp_path), "imgs", "cats", "1.png")]
    assert recs[0]["messages"][0] == {"role": "user", "content": "<image>\nWhat is this?", "loss": True}
    assert recs[1]["messages"][0]["content"] == "<image>\n<image>\nand  compare"
    assert len(recs[1]["images"]) == 2


def test_sharegpt_and_oasst1_and_text(tmp_path):
    p = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "system", "value": "S"},
                                                              {"from": "human", "value": "Q"},
                                                              {"from": "gpt", "value": "A"}]}])
    assert [m["role"] for m in records(p)[0]["messages"]] == ["system", "user", "assistant"]
    p = write_jsonl(tmp_path / "o.jsonl", [{"text": "### Human: Hi ### Assistant: Hello ### Human: dangling"}])
    assert records(p)[0]["messages"] == [{"role": "user", "content": "Hi", "loss": True},
                                         {"role": "assistant", "content": "Hello", "loss": True}]
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain corpus text"}])
    assert records(p)[0] == {"id": f"{p}:1", "text": "plain corpus text"}


def test_parquet_and_datasets_folder(tmp_path):
    rows = [{"instruction": "i", "input": "", "output": "o"}]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "dsdir"))
    assert records(tmp_path / "d.parquet")[0]["messages"][1]["content"] == "o"
    assert records(tmp_path / "dsdir")[0]["messages"][1]["content"] == "o"


def test_malformed_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": broken}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:3: not valid JSON"):
        records(p)


def test_malformed_json_file_names_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n {"text": "a"},\n {"text": }\n]')
    with pytest.raises(UserError, match=r"bad\.json:3"):
        records(p)


def test_json_files_stream_with_lines_and_accept_one_object_or_json_lines(tmp_path, monkeypatch):
    from llava_ft.data import jsonio

    rows = [{"text": f"t{i}\nmore"} for i in range(5)]
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(rows, indent=2))
    monkeypatch.setattr(jsonio, "_CHUNK", 7)  # records straddle read chunks: the list is not read at once
    recs = records(listed)
    assert [r["text"] for r in recs] == [r["text"] for r in rows]
    lines = listed.read_text().splitlines()
    assert all(lines[int(r["id"].rsplit(":", 1)[1]) - 1].strip() == "{" for r in recs)  # id = file:line
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"text": "solo"}, indent=2))
    assert [r["text"] for r in records(one)] == ["solo"]
    lines_as_json = tmp_path / "lines.json"
    write_jsonl(lines_as_json, rows)
    assert len(records(lines_as_json)) == 5
    scalars = tmp_path / "scalars.json"
    scalars.write_text('[\n {"text": "a"},\n 7\n]')
    with pytest.raises(UserError, match=r"scalars\.json:3: expected a JSON object per list item, got int"):
        records(scalars)


def test_unknown_format_lists_choices(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    with pytest.raises(UserError, match="alpaca.*sharegpt"):
        records(p, fmt="alpacca")


def test_undetectable_and_missing(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"foo": 1}])
    with pytest.raises(UserError, match=r"a\.jsonl:1: cannot detect"):
        records(p)
    with pytest.raises(UserError, match="does not exist"):
        records(tmp_path / "nope.jsonl")
    p = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "x"}])
    with pytest.raises(UserError, match=r"b\.jsonl:1: alpaca record has no 'output'"):
        records(p, fmt="alpaca")
