"""The training data pass on bad data (llava_ft.data.read + prepare_dataset): every problem listed at once
(capped, "... and N more"), or with data.skip_bad_samples skipped and counted by reason; images that
leave image_folder counted; missing files and image folders reported up front."""
import json
import logging

import pytest
from PIL import Image
from transformers import AutoTokenizer

from llava_ft.config import DataConfig, DataSource
from llava_ft.data.dataset import prepare_dataset
from llava_ft.data.read import read_sources
from llava_ft.errors import UserError


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return AutoTokenizer.from_pretrained(tiny_tokenizer)


def conv(q="<image>\nWhat?", a="A square."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def bad_file(tmp_path):
    """Two good records and one of each per-record problem, in a JSONL file (lines 1..7)."""
    lines = [
        json.dumps({"id": "ok1", "conversations": conv("Hi", "Hello")}),
        '{"id": "broken", "conversations": [',                                  # invalid JSON (line 2)
        json.dumps({"id": "robot", "conversations": [{"from": "robot", "value": "x"}]}),  # bad role
        json.dumps({"id": "noconv", "text_only": "nothing"}),                    # no conversations
        json.dumps({"id": "twoimg", "conversations": conv("<image> <image> two?")}),  # 2 markers, 0 images
        json.dumps({"id": "ok2", "conversations": conv("Bye", "Bye")}),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"id": "latin", "conversations": "caf\xe9"}\n')
    return str(path)


def data_cfg(tmp_path, path, **kw):
    return DataConfig(sources=[DataSource(path=path, format="sharegpt", **kw.pop("src", {}))],
                      template="qwen_chat", max_length=256, cache_dir=str(tmp_path / "cache"), **kw)


def test_without_skip_every_problem_is_listed_in_one_error(tmp_path, tok):
    path = bad_file(tmp_path)
    with pytest.raises(UserError) as err:
        prepare_dataset(data_cfg(tmp_path, path), tok)
    msg = str(err.value)
    assert msg.startswith("5 bad record(s) in the training data")
    for where in (":2: not valid JSON", ":3: conversations[0] has from='robot'", ":4: sharegpt record has no",
                  "bad.jsonl: sample twoimg: 2 '<image>' marker(s)", ":7: byte 0xe9 at byte offset"):
        assert where in msg, where
    assert "data.skip_bad_samples=true" in msg


def test_listing_is_capped_with_and_n_more(tmp_path, tok):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"conversations": conv("x")[:1] + [{"from": "robot", "value": "y"}]}) + "\n"
                            for _ in range(26)))
    with pytest.raises(UserError) as err:
        read_sources(data_cfg(tmp_path, str(path)))
    msg = str(err.value)
    assert msg.startswith("26 bad record(s)") and msg.count("has from='robot'") == 20 and "... and 6 more" in msg


def test_skip_counts_each_reason_and_never_suggests_the_flag(tmp_path, tok, caplog):
    path = bad_file(tmp_path)
    with caplog.at_level(logging.WARNING):
        prepared = prepare_dataset(data_cfg(tmp_path, path, skip_bad_samples=True), tok)
    assert len(prepared.dataset) == 2
    assert prepared.stats["skipped"] == {"invalid_json": 1, "bad_role": 1, "no_conversations": 1,
                                         "image_marker_mismatch": 1, "not_utf8": 1}
    assert prepared.stats["skipped_total"] == 5 and prepared.stats["records"] == 7
    assert "skipping bad record" in caplog.text and "skip_bad_samples" not in caplog.text
    again = prepare_dataset(data_cfg(tmp_path, path, skip_bad_samples=True), tok)  # cache hit keeps the counts
    assert again.stats["cache_hit"] and again.stats["skipped_total"] == 5


def write_png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)


def test_unreadable_images_all_listed_before_training(tmp_path):
    folder = tmp_path / "imgs"
    write_png(folder / "good.png")
    rows = [{"id": "good", "image": "good.png", "conversations": conv()}]
    for i in range(23):
        (folder / f"bad{i}.png").write_bytes(b"not a png")
        rows.append({"id": f"s{i}", "image": f"bad{i}.png", "conversations": conv()})
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(rows))
    cfg = data_cfg(tmp_path, str(path), src={"image_folder": str(folder)})
    cfg.sources[0].format = "llava"
    with pytest.raises(UserError) as err:
        read_sources(cfg, check_images=True)
    msg = str(err.value)
    assert msg.startswith("23 bad record(s) in the training data (unreadable_image: 23)")
    assert msg.count("cannot decode") == 20 and "... and 3 more" in msg
    cfg.skip_bad_samples = True  # then they are found (and skipped) during training instead
    assert len(read_sources(cfg, check_images=True).records[0]) == 24


def test_images_that_passed_and_did_not_change_are_not_read_again(tmp_path, monkeypatch):
    """A rerun (or --resume) reads only images that are new, changed or failed before; a file replaced by a
    broken one is never trusted from the memo of the earlier check."""
    import os

    import llava_ft.data.images as images

    folder = tmp_path / "imgs"
    rows = []
    for i in range(6):
        write_png(folder / f"{i}.png")
        rows.append({"id": f"s{i}", "image": f"{i}.png", "conversations": conv()})
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(rows))
    cfg = data_cfg(tmp_path, str(path), src={"image_folder": str(folder)})
    cfg.sources[0].format = "llava"
    read_files: list = []
    real_check = images.check_image

    def counting(source):  # the real check, counted
        read_files.append(os.path.basename(source))
        return real_check(source)

    monkeypatch.setattr(images, "check_image", counting)

    def rerun():
        read_files.clear()
        read_sources(cfg, check_images=True)
        return sorted(read_files)

    assert rerun() == [f"{i}.png" for i in range(6)]  # first run: every image
    assert list((tmp_path / "cache" / "image_checks").glob("*.npz"))
    assert rerun() == []  # nothing changed: none read
    write_png(folder / "6.png")  # the data file grown by one sample and reordered: only the new image is read
    path.write_text(json.dumps(rows[::-1] + [{"id": "s6", "image": "6.png", "conversations": conv()}]))
    assert rerun() == ["6.png"]
    path.write_text(json.dumps(rows))
    assert rerun() == []
    Image.new("RGB", (9, 9), (0, 0, 255)).save(folder / "2.png")  # replaced by another valid image
    assert rerun() == ["2.png"]
    assert rerun() == []
    (folder / "4.png").write_bytes(b"not a png")  # broken after it passed: found again
    with pytest.raises(UserError, match="4.png"):
        rerun()
    with pytest.raises(UserError, match="4.png"):  # and on every run until it is fixed
        rerun()
    assert read_files == ["4.png"]
    os.remove(folder / "5.png")
    write_png(folder / "4.png")
    with pytest.raises(UserError, match="5.png.*file not found"):
        rerun()
    assert sorted(read_files) == ["4.png", "5.png"]
    write_png(folder / "5.png")
    assert rerun() == ["5.png"]
    # Damaged in place at the same size, its old mtime put back (as tar or `cp -p` do): the ctime tells.
    target = folder / "3.png"
    before, data = os.stat(target), bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(target).st_size == before.st_size and os.stat(target).st_mtime_ns == before.st_mtime_ns
    with pytest.raises(UserError, match="3.png"):
        rerun()
    write_png(target)
    assert rerun() == ["3.png"]
    memo = tmp_path / "cache" / "image_checks"  # a damaged memo only costs time, then is written anew
    for f in memo.glob("*.npz"):
        f.write_bytes(b"garbage")
    assert rerun() == [f"{i}.png" for i in range(6)]
    assert rerun() == []
    import shutil

    shutil.rmtree(memo)
    memo.write_text("in the way")  # a file where its folder goes: unwritable even for root
    assert rerun() == [f"{i}.png" for i in range(6)]
    assert rerun() == [f"{i}.png" for i in range(6)]


def test_paths_leaving_image_folder_are_counted(tmp_path, tok):
    folder = tmp_path / "imgs"
    write_png(folder / "in.png")
    write_png(tmp_path / "elsewhere" / "x.png")
    rows = [{"id": "in", "image": "in.png", "conversations": conv()},
            {"id": "out", "image": "../elsewhere/x.png", "conversations": conv()}]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(rows))
    cfg = data_cfg(tmp_path, str(path), src={"image_folder": str(folder)})
    data = read_sources(cfg, check_images=True)
    assert data.outside_image_folder == 1 and data.outside_example.startswith("sample out: ")
    prepared = prepare_dataset(cfg, tok, num_image_tokens=4, source_data=data)
    assert len(prepared.dataset) == 2 and prepared.stats["images_outside_folder"] == 1


def test_missing_file_and_missing_image_folder(tmp_path):
    with pytest.raises(UserError, match="data file '.*nope.jsonl' does not exist"):
        read_sources(data_cfg(tmp_path, str(tmp_path / "nope.jsonl")))
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"conversations": conv("hi", "ho")}) + "\n")
    with pytest.raises(UserError, match=r"data.sources\[0\].image_folder '.*no_imgs' is not a folder"):
        read_sources(data_cfg(tmp_path, str(path), src={"image_folder": str(tmp_path / "no_imgs")}))


def test_a_json_list_cut_by_a_syntax_error_is_never_skipped(tmp_path, tok):
    good = json.dumps({"conversations": conv("hi", "ho")})
    path = tmp_path / "list.json"
    path.write_text(f"[{good},\n{good},\n{{oops}},\n{good}]")
    with pytest.raises(UserError) as err:
        read_sources(data_cfg(tmp_path, str(path), skip_bad_samples=True))
    msg = str(err.value)
    assert f"{path}:3: not valid JSON" in msg and "nothing after it in this JSON list can be read" in msg
    assert "skip_bad_samples=true" not in msg  # the flag is on; it cannot help here
