"""Tests for the multimodal data path: LlavaDataset (lazy images, pad-to-square, bad images skipped and
counted) and MultimodalCollator (padding, image order, dummy image), end to end into LlavaFtModel.

Run: python -m pytest tests/test_mm_collate.py -x -q
"""
from __future__ import annotations


import datasets
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from llava_ft import IGNORE_INDEX, IMAGE_TOKEN_INDEX as IMG
from llava_ft.config import DataConfig, DataSource, ModelConfig
from llava_ft.data.images import BadImageError
from llava_ft.data.llava_dataset import LlavaDataset
from llava_ft.data.mm_collate import MultimodalCollator
from llava_ft.errors import UserError


def _colour_image(path, colour, size=(8, 4)):
    Image.new("RGB", size, colour).save(path)
    return str(path)


def _to_tensor(img):
    # Raw 0-255 pixels, no resize: lets tests read back exactly what reached the model.
    return torch.tensor(list(img.getdata()), dtype=torch.float32).T.reshape(3, img.size[1], img.size[0])


def _rows(tmp_path):
    red = _colour_image(tmp_path / "red.png", (255, 0, 0))
    blue = _colour_image(tmp_path / "blue.png", (0, 0, 255))
    return datasets.Dataset.from_dict({
        "id": ["two", "text", "one"],
        "input_ids": [[1, IMG, 5, IMG, 6], [1, 7, 8], [IMG, 9]],
        "labels": [[-100, -100, 5, -100, 6], [-100, 7, 8], [-100, 9]],
        "length": [5, 3, 2], "modality_length": [5, -3, 2],
        "images": [[red, blue], [], [blue]],
    })


def test_dataset_loads_images_in_placeholder_order_and_pads_with_mean(tmp_path):
    ds = LlavaDataset(_rows(tmp_path), preprocess=_to_tensor, image_mean=(10, 20, 30), pad_to_square=True)
    item = ds[0]
    assert item["id"] == "two" and item["input_ids"] == [1, IMG, 5, IMG, 6]
    px = item["pixel_values"]
    assert px.shape == (2, 3, 8, 8)  # 8x4 padded to a square
    assert px[0, :, 4, 4].tolist() == [255, 0, 0] and px[1, :, 4, 4].tolist() == [0, 0, 255]
    assert px[0, :, 0, 0].tolist() == [10, 20, 30]  # the padding band carries the mean colour
    assert ds[1]["pixel_values"] is None
    no_pad = LlavaDataset(_rows(tmp_path), preprocess=_to_tensor)
    assert no_pad[2]["pixel_values"].shape == (1, 3, 4, 8)


def test_collator_pads_and_orders_images(tmp_path):
    ds = LlavaDataset(_rows(tmp_path), preprocess=_to_tensor)
    batch = MultimodalCollator(pad_token_id=0, image_shape=(3, 4, 8))([ds[2], ds[1], ds[0]])
    assert batch["input_ids"].tolist() == [[IMG, 9, 0, 0, 0], [1, 7, 8, 0, 0], [1, IMG, 5, IMG, 6]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1] * 5]
    assert batch["labels"][0].tolist() == [-100, 9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    # Row-major placeholder order: row 0's blue, then row 2's red, blue.
    colours = [batch["pixel_values"][k, :, 0, 0].tolist() for k in range(3)]
    assert colours == [[0, 0, 255], [255, 0, 0], [0, 0, 255]]


def test_text_only_batch_gets_one_dummy_image(tmp_path):
    ds = LlavaDataset(_rows(tmp_path), preprocess=_to_tensor)
    batch = MultimodalCollator(pad_token_id=0, image_shape=(3, 32, 32))([ds[1], ds[1]])
    assert batch["pixel_values"].shape == (1, 3, 32, 32) and not batch["pixel_values"].any()


def test_placeholder_image_mismatch_names_the_sample(tmp_path):
    rows = _rows(tmp_path).to_dict()
    rows["images"][2] = []
    ds = LlavaDataset(datasets.Dataset.from_dict(rows), preprocess=_to_tensor)
    with pytest.raises(UserError, match="sample one: 1 <image> placeholders in the text but 0 images"):
        ds[2]
    with pytest.raises(UserError, match="sample x: 1 <image> placeholders but 0 images"):
        MultimodalCollator()([{"id": "x", "input_ids": [IMG], "labels": [-100], "pixel_values": None}])


def test_corrupt_image_skipped_and_counted_or_fatal(tmp_path):
    rows = _rows(tmp_path).to_dict()
    bad = tmp_path / "bad.png"
    data = open(rows["images"][0][0], "rb").read()
    bad.write_bytes(data[: len(data) // 2])
    rows["images"][0] = [str(bad), rows["images"][0][1]]
    hf = datasets.Dataset.from_dict(rows)
    strict = LlavaDataset(hf, preprocess=_to_tensor)
    with pytest.raises(BadImageError, match=r"sample two: image .*bad.png"):
        strict[0]
    lenient = LlavaDataset(hf, preprocess=_to_tensor, skip_bad_samples=True)
    item = lenient[0]
    assert item["id"] == "text" and lenient.num_bad_images == 1  # replaced by the next good sample
    assert lenient[0]["id"] == "text" and lenient.num_bad_images == 1  # known bad: not re-read
    # In DataLoader workers the count reaches the main process.
    fresh = LlavaDataset(hf, preprocess=_to_tensor, skip_bad_samples=True)
    loader = DataLoader(fresh, batch_size=3, num_workers=1,
                        collate_fn=MultimodalCollator(pad_token_id=0, image_shape=(3, 4, 8)))
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 3 and fresh.num_bad_images == 1


def test_demo_data_end_to_end_into_the_model(tmp_path, demo_data, tiny_llama, tiny_tokenizer, tiny_clip):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llava_ft.data.dataset import prepare_dataset
    from llava_ft.data.sampler import LengthGroupedSampler
    from llava_ft.model.llava import LlavaFtModel
    from llava_ft.model.projector import Projector
    from llava_ft.model.vision import load_visual_encoder

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    ve = load_visual_encoder(ModelConfig(llm="unused", visual_encoder=tiny_clip))
    cfg = DataConfig(sources=[DataSource(path=demo_data["finetune"], image_folder=demo_data["image_folder"]),
                              DataSource(path=demo_data["text"], format="text")],
                     template="default", max_length=256, cache_dir=str(tmp_path / "cache"),
                     pad_image_to_square=True)
    prepared = prepare_dataset(cfg, tok, num_image_tokens=ve.num_image_tokens)
    ds = LlavaDataset(prepared.dataset, ve, cfg)
    sampler = LengthGroupedSampler(ds.modality_lengths, batch_size=4, seed=0)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=MultimodalCollator(tok, ve.image_shape))
    llm = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = LlavaFtModel(llm, ve, Projector(ve.hidden_size, llm.config.hidden_size))
    seen_image = seen_text = False
    for step, batch in enumerate(loader):
        n_img = int((batch["input_ids"] == IMG).sum())
        seen_image |= n_img > 0
        seen_text |= n_img == 0
        assert batch["pixel_values"].shape[0] == max(n_img, 1)
        out = model(**batch)
        assert torch.isfinite(out.loss)
        if step >= 6 and seen_image and seen_text:
            break
    assert seen_image and seen_text


def test_engine_style_construction_and_columns(tmp_path, tiny_clip):
    from llava_ft.model.vision import load_visual_encoder

    ve = load_visual_encoder(ModelConfig(llm="unused", visual_encoder=tiny_clip))
    ds = LlavaDataset(_rows(tmp_path), ve, DataConfig(pad_image_to_square=True, skip_bad_samples=True))
    assert ds.pad_to_square and ds.skip_bad_samples and ds.image_mean == ve.image_mean
    assert "modality_length" in ds.column_names and ds["modality_length"] == [5, -3, 2]
    assert ds[0]["pixel_values"].shape == (2, *ve.image_shape)
