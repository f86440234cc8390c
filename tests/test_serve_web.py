"""The web chat page (`GET /`) driven in headless Chromium through Selenium and Debian's chromedriver.

Starts a live server around the tiny LLaVA model (and a tiny LLaVA-OneVision one for a video clip), opens the
page, picks an image with the file input, asks a question and waits for the streamed answer, then checks it equals the model's own greedy answer, asks a
follow-up (multi-turn), resets, and saves screenshots (`serve_page.png`, `serve_page_reset.png` under
pytest's tmp dir; set LLAVA_FT_SCREENSHOT_DIR to keep copies elsewhere).

Needs: `apt-get install -y chromium chromium-driver` and `pip install selenium`; skipped with the reason
otherwise. Selenium is given the chromedriver path, so it never tries to download a browser.

    python -m pytest tests/test_serve_web.py -q
"""
from __future__ import annotations

import base64
import os
import shutil

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")

from PIL import Image  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from llava_ft.inference import GenerationSettings, load_chat_model  # noqa: E402
from llava_ft.serve.app import create_app  # noqa: E402
from llava_ft.testing.server import serve_in_thread  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="no headless browser: apt-get install -y chromium chromium-driver")


@pytest.fixture(scope="module")
def llava_model(tmp_path_factory, tiny_llama, tiny_clip):
    import torch
    from transformers import AutoConfig

    from llava_ft.model.projector import Projector

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("web_llava")
    vis = AutoConfig.from_pretrained(tiny_clip)
    Projector(getattr(vis, "vision_config", vis).hidden_size, AutoConfig.from_pretrained(tiny_llama).hidden_size,
              depth=2).save_pretrained(out / "projector")
    return load_chat_model(tiny_llama, llava=str(out), visual_encoder=tiny_clip, device="cpu")


@pytest.fixture()
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,800", "--disable-extensions"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _save(driver, tmp_path, name: str) -> str:
    path = str(tmp_path / name)
    driver.save_screenshot(path)
    keep = os.environ.get("LLAVA_FT_SCREENSHOT_DIR")
    if keep:
        os.makedirs(keep, exist_ok=True)
        shutil.copy(path, os.path.join(keep, name))
    return path


def _answers(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#log .msg.assistant")


def _open_greedy(driver, url: str, model_name: str, max_tokens: int) -> None:
    """Open the page and set what it sends to greedy, so answers can be compared with the model's own."""
    driver.get(url + "/")
    WebDriverWait(driver, 30).until(lambda d: model_name in d.find_element(By.ID, "model-name").text)
    for field, value in (("temperature", "0"), ("max-tokens", str(max_tokens))):
        el = driver.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)


def _ask(driver, text: str, n_before: int) -> str:
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()
    wait = WebDriverWait(driver, 120, poll_frequency=0.1)
    # streaming: the bubble shows text (with the blinking cursor class) before the answer is complete
    wait.until(lambda d: len(_answers(d)) == n_before + 1)
    wait.until(lambda d: "streaming" not in _answers(d)[-1].get_attribute("class"))
    assert not driver.find_elements(By.CSS_SELECTOR, "#log .msg.error"), \
        driver.find_element(By.CSS_SELECTOR, "#log .msg.error").text
    return _answers(driver)[-1].find_element(By.CLASS_NAME, "text").get_attribute("textContent")


def test_page_upload_ask_stream_multiturn_reset(browser, llava_model, demo_data, tmp_path):
    image_path = os.path.join(demo_data["image_folder"], "eval", "eval_00001.png")
    question, follow_up = "What colour is the shape?", "And what shape is it?"
    max_tokens = 24
    with serve_in_thread(create_app(llava_model, "tiny-llava")) as url:
        _open_greedy(browser, url, "tiny-llava", max_tokens)
        assert "text + images" in browser.find_element(By.ID, "model-name").text

        browser.find_element(By.ID, "image-input").send_keys(image_path)  # what "pick an image" does
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "preview").is_displayed())

        # record every length the answer bubble shows while it is still streaming
        browser.execute_script("""
            window.__seen = [];
            new MutationObserver(() => {
              const b = document.querySelector('#log .msg.assistant.streaming .text');
              if (b && b.textContent) window.__seen.push(b.textContent.length);
            }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
        """)
        first = _ask(browser, question, 0)
        partial = sorted(set(browser.execute_script("return window.__seen;")))
        assert len(partial) >= 2 and partial[0] < len(first), f"answer did not arrive in pieces: {partial}"
        img = Image.open(image_path).convert("RGB")
        settings = GenerationSettings(max_new_tokens=max_tokens, temperature=0)
        turn1 = [{"role": "user", "content": "<image>\n" + question}]
        expected = llava_model.chat(turn1, images=[img], settings=settings).text
        assert first == expected
        # the image was sent with the first question and shown in the user's bubble; the picker is cleared
        user_msgs = browser.find_elements(By.CSS_SELECTOR, "#log .msg.user")
        assert len(user_msgs) == 1 and user_msgs[0].find_elements(By.TAG_NAME, "img")
        assert not browser.find_element(By.ID, "preview").is_displayed()
        _save(browser, tmp_path, "serve_page.png")

        second = _ask(browser, follow_up, 1)
        turn2 = turn1 + [{"role": "assistant", "content": first}, {"role": "user", "content": follow_up}]
        assert second == llava_model.chat(turn2, images=[img], settings=settings).text
        shot = _save(browser, tmp_path, "serve_page_two_turns.png")
        assert os.path.getsize(shot) > 10_000

        browser.find_element(By.ID, "reset").click()
        assert _answers(browser) == [] and not browser.find_elements(By.CSS_SELECTOR, "#log .msg.user")
        # after reset the conversation starts over: the same question without image is a fresh turn
        third = _ask(browser, question, 0)
        assert third == llava_model.chat([{"role": "user", "content": question}], settings=settings).text
        _save(browser, tmp_path, "serve_page_reset.png")

        # dropping an image file anywhere on the page attaches it, like picking one
        with open(image_path, "rb") as f:
            b64 = base64.b64encode(f.read()).decode()
        browser.execute_script("""
            const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
            window.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
        """, b64)
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "preview").is_displayed())
        assert _ask(browser, question, 1) == llava_model.chat(
            [{"role": "user", "content": question}, {"role": "assistant", "content": third},
             {"role": "user", "content": "<image>\n" + question}], images=[img], settings=settings).text


def test_page_shows_server_errors(browser, llava_model):
    """A failing request (here: wrong API key) shows the server's message instead of hanging."""
    with serve_in_thread(create_app(llava_model, "tiny-llava", api_key="sk-right")) as url:
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "key-box").is_displayed())
        browser.find_element(By.ID, "api-key").send_keys("sk-wrong")
        browser.find_element(By.ID, "prompt").send_keys("hello")
        browser.find_element(By.ID, "send").click()
        err = WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#log .msg.error"))
        assert "401" in err[0].text and "API key" in err[0].text
        assert _answers(browser) == []  # the failed turn is not kept as an empty answer


def test_page_sends_a_video_clip_to_a_onevision_model(browser, tiny_tokenizer, tmp_path):
    """With a LLaVA-OneVision model the picker also takes a clip: it is shown in the user's bubble, sent as a
    `video_url` data: URL, and the streamed answer equals the model's own greedy answer on that clip."""
    from llava_ft.testing.llava_next import build_tiny_llava_onevision, write_test_video

    model = load_chat_model(build_tiny_llava_onevision(tmp_path / "ov", tiny_tokenizer, max_tiles=4),
                            torch_dtype="fp32")
    clip = write_test_video(tmp_path / "clip.mp4", frames=10)
    question, max_tokens = "What moves?", 8
    with serve_in_thread(create_app(model, "tiny-ov")) as url:
        _open_greedy(browser, url, "tiny-ov", max_tokens)
        assert "text + images + video" in browser.find_element(By.ID, "model-name").text
        browser.find_element(By.ID, "image-input").send_keys(clip)
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "preview-video").is_displayed())
        answer = _ask(browser, question, 0)
        settings = GenerationSettings(max_new_tokens=max_tokens, temperature=0)
        assert answer == model.chat([{"role": "user", "content": "<video>\n" + question}], [clip], settings).text
        user_msgs = browser.find_elements(By.CSS_SELECTOR, "#log .msg.user")
        assert len(user_msgs) == 1 and user_msgs[0].find_elements(By.TAG_NAME, "video")
        assert not browser.find_element(By.ID, "preview-video").is_displayed()
        _save(browser, tmp_path, "serve_page_video.png")
