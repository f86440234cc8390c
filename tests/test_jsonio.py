"""Bytes that are not UTF-8 in .json/.jsonl data: one line naming file, line and byte offset, never a
UnicodeDecodeError traceback; with an error callback the bad record is skipped and reading goes on."""
import pytest

from llava_ft.config import DataSource
from llava_ft.data.formats import iter_records
from llava_ft.data.jsonio import detect_container, iter_raw
from llava_ft.errors import UserError

GOOD = b'{"instruction": "a", "input": "", "output": "b"}'
BAD = b'{"instruction": "caf\xe9", "input": "", "output": "b"}'  # latin-1 e-acute


def test_jsonl_bad_byte_names_file_line_and_offset(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(GOOD + b"\n" + BAD + b"\n" + GOOD + b"\n")
    with pytest.raises(UserError) as err:
        list(iter_raw(p))
    msg = str(err.value)
    offset = len(GOOD) + 1 + BAD.index(b"\xe9")
    assert msg.startswith(f"{p}:2: byte 0xe9 at byte offset {offset} is not UTF-8") and "\n" not in msg
    problems = []
    values = [r.value for r in iter_raw(p, on_error=problems.append)]
    assert len(values) == 2  # the bad line is skipped, the lines after it are read
    assert [(q.line, q.kind) for q in problems] == [(2, "not_utf8")]


def test_json_list_bad_byte_skips_only_that_record(tmp_path):
    p = tmp_path / "d.json"
    body = b"\xef\xbb\xbf[" + GOOD + b",\r\n " + BAD + b",\n" + GOOD + b"]"
    p.write_bytes(body)
    assert detect_container(p) == "json"
    offset = body.index(b"\xe9")
    with pytest.raises(UserError, match=rf"d.json:2: byte 0xe9 at byte offset {offset} "):
        list(iter_raw(p))
    problems = []
    values = [r.value for r in iter_raw(p, on_error=problems.append)]
    assert len(values) == 2 and [(q.line, q.kind) for q in problems] == [(2, "not_utf8")]


def test_bad_byte_in_first_chunk_and_in_a_json_named_jsonl(tmp_path):
    # the container sniffing must not decode: the bad byte is in the first 4096 bytes
    p = tmp_path / "lines.json"
    p.write_bytes(BAD + b"\n" + GOOD + b"\n")
    with pytest.raises(UserError, match=r"lines.json:1: byte 0xe9 at byte offset 20 is not UTF-8"):
        list(iter_records(DataSource(path=str(p))))
    seen = []
    recs = list(iter_records(DataSource(path=str(p)), on_problem=lambda reason, msg: seen.append((reason, msg))))
    assert len(recs) == 1 and seen[0][0] == "not_utf8" and seen[0][1].startswith(f"{p}:1: byte 0xe9")


def test_other_files_read_at_once_name_the_bad_byte_too(tmp_path):
    """Same class of defect: a YAML config, an eval JSONL and an MMBench .tsv with a latin-1 byte."""
    from llava_ft.config import load_config
    from llava_ft.inference.evaluate import load_qa

    cfg = tmp_path / "cfg.yaml"
    cfg.write_bytes(b"\xef\xbb\xbfmodel:\n  llm: x\ndata:\n  system: caf\xe9\n")
    with pytest.raises(UserError, match=r"cfg.yaml:4: byte 0xe9 at byte offset 38 is not UTF-8"):
        load_config(str(cfg))
    qa = tmp_path / "qa.jsonl"
    qa.write_bytes(b'{"question": "q", "answer": "a"}\n{"question": "caf\xe9", "answer": "a"}\n')
    with pytest.raises(UserError, match=rf"qa.jsonl:2: byte 0xe9 at byte offset {qa.read_bytes().index(233)} "):
        load_qa(qa)
    tsv = tmp_path / "mmb.tsv"
    tsv.write_bytes(b"index\tquestion\tA\tB\tanswer\n0\tcaf\xe9?\tx\ty\tA\n")
    with pytest.raises(UserError, match=rf"mmb.tsv:2: byte 0xe9 at byte offset {tsv.read_bytes().index(233)} "):
        load_qa(tsv)
