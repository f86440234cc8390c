"""Text-only questions to LLaVA models, for every artifact kind (iter_N.pth, work dir, XTuner layout, llava-hf):
chat (ChatModel and the CLI), eval and serve (one request, and the worker's batched path), alone, after an
image turn, and in a batch made only of text-only requests. Each answer is compared with the model's own
answer to the same prompt, so the tests check the right text comes back, not only that nothing crashed."""
from __future__ import annotations

import asyncio
import base64
import random

import pytest

from llava_ft.convert import pth_to_hf
from llava_ft.demo.assets import draw_shape
from llava_ft.inference import GenerationSettings, load_chat_model
from llava_ft.testing.checkpoints import write_random_checkpoint

KINDS = ["iter_pth", "work_dir", "xtuner", "llava_hf"]
GREEDY = GenerationSettings(max_new_tokens=6, temperature=0.0)
HI = [{"role": "user", "content": "Hi, who are you?"}]
OTHER = [{"role": "user", "content": "Name a shape."}]
AFTER_IMAGE = [{"role": "user", "content": "<image>\nWhat colour is it?"}, {"role": "assistant", "content": "Red."},
               {"role": "user", "content": "And what is a square?"}]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_llama, tiny_clip) -> dict:
    root = tmp_path_factory.mktemp("text_only")
    raw = {"model": {"llm": tiny_llama, "visual_encoder": tiny_clip, "freeze_llm": True,
                     "llm_lora": {"enabled": True, "r": 4, "alpha": 8}},
           "data": {"template": "chatml", "sources": [{"path": "unused.json"}]}}
    pth = write_random_checkpoint(root / "run", raw)
    return {"iter_pth": pth, "work_dir": str(root / "run"),
            "xtuner": pth_to_hf(None, pth, root / "xtuner"),
            "llava_hf": pth_to_hf(None, pth, root / "llava_hf", fmt="llava-hf")}


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("img") / "red.png"
    draw_shape("red", "circle", random.Random(0), 40).save(path)
    return str(path)


_models: dict = {}


@pytest.fixture(params=KINDS)
def kind_model(request, artifacts):
    kind = request.param
    if kind not in _models:
        _models[kind] = load_chat_model(artifacts[kind], device="cpu")
    return kind, artifacts[kind], _models[kind]


@pytest.mark.smoke
def test_chat_model_answers_text_only(kind_model, image):
    from llava_ft.inference.batch_stream import StreamRequest

    kind, _, cm = kind_model
    assert cm.supports_images
    alone = cm.chat(HI, [], GREEDY)
    assert alone.completion_tokens > 0 and alone.prompt_tokens == cm.encode(HI).length
    stream = cm.stream_chat(HI, [], GREEDY)
    assert "".join(stream) == alone.text == stream.result.text
    # a text-only question after an image turn (the image stays in the prompt)
    after = cm.chat(AFTER_IMAGE, [image], GREEDY)
    assert after.completion_tokens > 0 and after.prompt_tokens == cm.encode(AFTER_IMAGE, [image]).length
    # batches made only of text-only requests: eval's generate_batch and serve's stream_batch
    other = cm.chat(OTHER, [], GREEDY).text
    assert [r.text for r in cm.generate_batch([(HI, []), (OTHER, [])], GREEDY, batch_size=2)] == [alone.text, other]
    rows = cm.stream_batch([StreamRequest(HI, [], GREEDY, lambda d: None),
                            StreamRequest(OTHER, [], GREEDY, lambda d: None)])
    assert [r.text for r in rows] == [alone.text, other]
    # and a batch mixing both
    mixed = cm.generate_batch([(HI, []), (AFTER_IMAGE, [image])], GREEDY, batch_size=2)
    assert [r.text for r in mixed] == [alone.text, after.text]


def test_eval_with_text_only_questions(kind_model, image):
    from llava_ft.inference.evaluate import QAItem, evaluate

    _, _, cm = kind_model
    want = cm.chat(HI, [], GREEDY).text
    with_image = cm.chat([{"role": "user", "content": "What colour?"}], [image], GREEDY).text
    items = [QAItem("t", HI[0]["content"], want), QAItem("i", "What colour?", with_image, [image]),
             QAItem("t2", HI[0]["content"], "something else")]
    report = evaluate(cm, items, GREEDY, batch_size=3)
    assert [p["prediction"] for p in report.predictions] == [want, with_image, want]
    assert report.metrics["exact_match"] == pytest.approx(2 / 3)


def test_cli_prompt_text_only(kind_model, capsys):
    from llava_ft.cli import main

    _, path, cm = kind_model
    want = cm.chat(HI, [], GREEDY).text
    capsys.readouterr()
    code = main(["chat", path, "--prompt", HI[0]["content"], "--temperature", "0", "--max-new-tokens", "6",
                 "--no-streamer", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.endswith(want + "\n")  # --no-streamer prints the whole answer, then a newline


def _png_data_url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


@pytest.mark.smoke
def test_serve_text_only_alone_after_image_and_batched(kind_model, image):
    """Over HTTP: a text-only request and a text-only turn after an image turn are 200 with the model's answer;
    in the worker, text-only requests that wait together are answered in one batch."""
    import httpx

    from llava_ft.serve.app import create_app
    from llava_ft.testing.server import serve_in_thread
    from llava_ft.serve.worker import GenerationWorker, Job

    _, _, cm = kind_model
    with serve_in_thread(create_app(cm, "m")) as url:
        body = {"model": "m", "messages": HI, "max_tokens": 6, "temperature": 0}
        resp = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == cm.chat(HI, [], GREEDY).text
        turns = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png_data_url(image)}},
                                              {"type": "text", "text": "What colour is it?"}]},
                 {"role": "assistant", "content": "Red."},
                 {"role": "user", "content": "And what is a square?"}]
        resp = httpx.post(url + "/v1/chat/completions", json={**body, "messages": turns}, timeout=120)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == cm.chat(AFTER_IMAGE, [image], GREEDY).text

    async def batch() -> list:
        worker = GenerationWorker(cm, max_queue=8, max_batch=4)
        loop = asyncio.get_running_loop()
        jobs = [Job(m, [], GREEDY, loop=loop) for m in (HI, OTHER, HI)]
        for job in jobs:  # queued before the thread starts: they are taken as one batch
            worker.submit(job)
        worker.start()
        answers = []
        for job in jobs:
            parts = []
            while True:
                kind, payload = await asyncio.wait_for(job.events.get(), timeout=120)
                if kind == "delta":
                    parts.append(payload)
                    continue
                assert kind == "done", payload.body() if kind == "error" else payload
                break
            answers.append("".join(parts))
        largest = worker.stats()["largest_batch"]
        await asyncio.to_thread(worker.stop)
        return answers, largest

    answers, largest = asyncio.run(batch())
    assert largest == 3
    assert answers == [cm.chat(m, [], GREEDY).text for m in (HI, OTHER, HI)]
