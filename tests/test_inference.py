"""ChatModel behaviour users and the server rely on: streaming equals the whole answer, batches equal single
prompts, stop words end the answer and never show, history is trimmed to the context, bad input is a UserError."""
from __future__ import annotations

import random
import shutil

import pytest

from llava_ft.demo.assets import draw_shape
from llava_ft.errors import UserError
from llava_ft.inference import GenerationSettings, detect_artifact, load_chat_model
from llava_ft.inference.chat_model import ContextLengthError
from llava_ft.testing.checkpoints import write_random_checkpoint
from llava_ft.testing.variants import with_context

GREEDY = GenerationSettings(max_new_tokens=12, temperature=0.0)
Q = [{"role": "user", "content": "What shape is it?"}]


@pytest.fixture(scope="module")
def text_model(tiny_llama):
    return load_chat_model(tiny_llama, prompt_template="chatml")


@pytest.fixture(scope="module")
def llava_pth(tmp_path_factory, tiny_llama, tiny_clip):
    raw = {"model": {"llm": tiny_llama, "visual_encoder": tiny_clip, "freeze_llm": True,
                     "llm_lora": {"enabled": True, "r": 4, "alpha": 8}},
           "data": {"template": "vicuna", "sources": [{"path": "unused.json"}], "pad_image_to_square": True}}
    return write_random_checkpoint(tmp_path_factory.mktemp("llava_run"), raw)


@pytest.mark.smoke
def test_stream_equals_chat_and_reports_usage(text_model):
    stream = text_model.stream_chat(Q, settings=GREEDY)
    parts = list(stream)
    whole = text_model.chat(Q, settings=GREEDY)
    assert len(parts) > 1 and "".join(parts) == whole.text
    assert stream.result.text == whole.text
    assert stream.result.completion_tokens == whole.completion_tokens == 12
    assert whole.finish_reason == "length" and whole.prompt_tokens == len(text_model.encode(Q).ids)


def test_batch_with_left_padding_equals_single_prompts(text_model):
    convs = [(Q, []), ([{"role": "user", "content": "Tell me about yourself, please, in detail."}], []),
             ([{"role": "user", "content": "Hi"}], [])]
    batched = text_model.generate_batch(convs, GREEDY, batch_size=3)
    assert [r.text for r in batched] == [text_model.chat(m, settings=GREEDY).text for m, _ in convs]


def test_stream_batch_streams_each_row_like_a_single_answer(text_model, llava_pth, tmp_path):
    """One batched generate call (what the server does with concurrent requests): each row streams exactly
    the answer, token count and finish reason a lone request gets, with its own max_new_tokens and stops."""
    from llava_ft.inference.batch_stream import StreamRequest

    full = text_model.chat(Q, settings=GREEDY).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    rows = [(Q, GREEDY),
            ([{"role": "user", "content": "Tell me about yourself, please, in detail."}],
             GenerationSettings(max_new_tokens=5, temperature=0.0)),
            (Q, GenerationSettings(max_new_tokens=12, temperature=0.0, stop=(stop,))),
            ([{"role": "user", "content": "Hi"}], GenerationSettings(max_new_tokens=20, temperature=0.0))]
    parts: list = [[] for _ in rows]
    requests = [StreamRequest(m, [], st, on_delta=parts[i].append) for i, (m, st) in enumerate(rows)]
    results = text_model.stream_batch(requests)
    for (m, st), got, streamed in zip(rows, results, parts):
        alone = text_model.chat(m, settings=st)
        assert (got.text, got.completion_tokens, got.finish_reason, got.prompt_tokens) == (
            alone.text, alone.completion_tokens, alone.finish_reason, alone.prompt_tokens)
        assert "".join(streamed) == got.text and len(streamed) >= 1
    assert stop not in "".join(parts[2]) and results[2].finish_reason == "stop"
    assert results[1].completion_tokens == 5 and results[1].finish_reason == "length"

    # LLaVA rows with images, and a row cancelled before it starts (None, nothing streamed)
    cm = load_chat_model(llava_pth)
    img = tmp_path / "red.png"
    draw_shape("red", "circle", random.Random(0), 40).save(img)
    ask = [{"role": "user", "content": "<image>\nWhat colour?"}]
    gone: list = []
    got = cm.stream_batch([StreamRequest(ask, [str(img)], GREEDY, on_delta=lambda d: None),
                           StreamRequest(Q, [], GREEDY, on_delta=lambda d: None),
                           StreamRequest(Q, [], GREEDY, on_delta=gone.append, cancelled=lambda: True)])
    assert got[0].text == cm.chat(ask, [str(img)], GREEDY).text and got[1].text == cm.chat(Q, [], GREEDY).text
    assert got[2] is None and gone == []
    with pytest.raises(ValueError, match="same sampling settings"):
        cm.stream_batch([StreamRequest(Q, [], GREEDY, print),
                         StreamRequest(Q, [], GenerationSettings(temperature=0.7), print)])


def test_stop_word_ends_answer_and_is_never_streamed(text_model):
    full = text_model.chat(Q, settings=GREEDY).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    settings = GenerationSettings(max_new_tokens=12, temperature=0.0, stop=(stop,))
    expected = full[:full.index(stop)]
    stream = text_model.stream_chat(Q, settings=settings)
    assert "".join(stream) == expected == stream.result.text
    assert stream.result.finish_reason == "stop"
    assert text_model.chat(Q, settings=settings).text == expected


def test_sampling_is_reproducible_with_a_seed(text_model):
    s = GenerationSettings(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    assert text_model.chat(Q, settings=s).text == text_model.chat(Q, settings=s).text


def test_history_is_trimmed_to_the_context(text_model):
    long = [{"role": "system", "content": "Be brief."}]
    for i in range(60):
        long += [{"role": "user", "content": f"question {i} about a red circle and a blue square"},
                 {"role": "assistant", "content": "A red circle next to a blue square, as always."}]
    long.append({"role": "user", "content": "last question"})
    ctx = text_model.context_length
    msgs, images, dropped = text_model.fit_history(long, [], max_new_tokens=600)
    assert dropped > 0 and msgs[0]["role"] == "system" and msgs[-1]["content"] == "last question"
    assert text_model.encode(msgs).length + 600 <= ctx
    # max_new_tokens past half the context: half the context stays for history, the answer is capped
    big = text_model.fit(long, [], max_new_tokens=1600)
    assert ctx // 2 - 40 < big.prompt_tokens <= ctx // 2 and big.max_new_tokens == ctx - big.prompt_tokens < 1600
    with pytest.raises(ContextLengthError, match=rf"prompt is \d+ tokens.*context is {ctx} tokens") as info:
        text_model.fit_history([{"role": "user", "content": "x " * 3000}], [], 10)
    assert info.value.prompt_tokens > ctx and info.value.context_length == ctx


@pytest.fixture(scope="module")
def short_model(tiny_llama, tmp_path_factory):
    """tiny_llama with a 64-token context; greedy answers to Q run on without EOS (checked below)."""
    return load_chat_model(with_context(tiny_llama, tmp_path_factory.mktemp("short") / "llm", 64),
                           prompt_template="chatml")


def test_answer_is_capped_at_context_minus_prompt(short_model):
    """max_new_tokens past the context: every path generates context - prompt tokens, finish_reason length."""
    from llava_ft.inference.batch_stream import StreamRequest

    ctx = short_model.context_length
    assert ctx == 64
    huge = GenerationSettings(max_new_tokens=300, temperature=0.0)  # finite: the test must end unfixed too
    other = [{"role": "user", "content": "Tell me about yourself, please."}]
    room = ctx - short_model.encode(Q).length
    whole = short_model.chat(Q, settings=huge)
    assert (whole.completion_tokens, whole.finish_reason) == (room, "length")
    assert whole.text == short_model.chat(Q, settings=GenerationSettings(max_new_tokens=room)).text
    stream = short_model.stream_chat(Q, settings=huge)
    assert "".join(stream) == whole.text and stream.result.completion_tokens == room
    # a batch of prompts of different lengths: each row capped at its own room
    batch = short_model.generate_batch([(Q, []), (other, [])], huge, batch_size=2)
    rooms = [room, ctx - short_model.encode(other).length]
    assert [r.completion_tokens for r in batch] == rooms and batch[0].text == whole.text
    assert all(r.finish_reason == "length" for r in batch)
    rows = short_model.stream_batch([StreamRequest(Q, [], huge, lambda d: None),
                                     StreamRequest(other, [], huge, lambda d: None)])
    assert [r.completion_tokens for r in rows] == rooms and rows[0].text == whole.text
    # a prompt that alone fills the context is refused, naming both numbers
    with pytest.raises(ContextLengthError, match=r"prompt is \d+ tokens, and the model's context is 64 tokens"):
        short_model.chat([{"role": "user", "content": "circle square " * 40}], settings=huge)


def test_text_model_refuses_images_and_bad_messages(text_model, tmp_path):
    assert not text_model.supports_images
    with pytest.raises(UserError, match="text-only"):
        text_model.chat(Q, images=[str(tmp_path / "a.png")])
    with pytest.raises(UserError, match="last message"):
        text_model.chat([{"role": "assistant", "content": "hi"}])


@pytest.mark.smoke
def test_llava_checkpoint_chat_with_images(llava_pth, tmp_path):
    cm = load_chat_model(llava_pth)
    assert cm.supports_images and cm.template.name == "vicuna" and cm.pad_image_to_square
    img = tmp_path / "wide.png"
    draw_shape("blue", "square", random.Random(1), 48).resize((64, 32)).save(img)
    one = cm.chat([{"role": "user", "content": "Describe."}], [str(img)], GREEDY)
    assert one.prompt_tokens == len(cm.encode([{"role": "user", "content": "Describe."}], [str(img)]).ids) \
        + cm.num_image_tokens - 1
    # two images in one conversation, markers explicit
    two = [{"role": "user", "content": "<image>\nFirst."}, {"role": "assistant", "content": "Ok."},
           {"role": "user", "content": "<image>\nAnd this?"}]
    assert cm.chat(two, [str(img), str(img)], GREEDY).completion_tokens > 0
    with pytest.raises(UserError, match="marker"):
        cm.chat(two, [str(img)], GREEDY)
    with pytest.raises(UserError, match="no such file"):
        cm.chat(Q, [str(tmp_path / "missing.png")], GREEDY)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(UserError, match="bad.png"):
        cm.chat(Q, [str(bad)], GREEDY)


def test_artifact_kind_comes_from_saved_files(tmp_path, tiny_llama, llava_pth):
    renamed = tmp_path / "llava-13b-clip-lora"  # a misleading name changes nothing
    shutil.copytree(tiny_llama, renamed)
    assert detect_artifact(renamed).kind == "hf_model"
    assert detect_artifact(llava_pth).kind == "iter_pth"
    from pathlib import Path

    assert detect_artifact(Path(llava_pth).parent).path == llava_pth  # work dir -> newest checkpoint
    with pytest.raises(UserError, match="no such file"):
        detect_artifact(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model folder"):
        detect_artifact(tmp_path / "empty")


def test_marker_image_mismatch_in_chat_names_the_fix_not_a_training_setting(llava_pth):
    """A chat prompt with more <image> markers than images: one line saying what to do in a chat, not the
    training-data advice (data.skip_bad_samples) that the same check gives for a data set."""
    cm = load_chat_model(llava_pth)
    msgs = [{"role": "user", "content": "<image> and <image>: same colour?"}]
    with pytest.raises(UserError) as err:
        cm.chat(msgs, images=[draw_shape("red", "circle", __import__("random").Random(0), 48)])
    assert "2 '<image>' marker(s) but 1 image(s)" in str(err.value)
    assert "skip_bad_samples" not in str(err.value)
