"""`llava_ft chat` as a user drives it: a real pseudo-terminal session (pexpect) and the --prompt mode."""
from __future__ import annotations

import random
import subprocess
import sys

import pexpect
import pytest

from llava_ft.demo.assets import draw_shape
from llava_ft.inference import GenerationSettings, load_chat_model
from llava_ft.testing.checkpoints import write_random_checkpoint


@pytest.fixture(scope="module")
def run_pth(tmp_path_factory, tiny_llama, tiny_clip):
    raw = {"model": {"llm": tiny_llama, "visual_encoder": tiny_clip, "freeze_llm": True},
           "data": {"template": "chatml", "sources": [{"path": "unused.json"}]}}
    return write_random_checkpoint(tmp_path_factory.mktemp("chat_run"), raw)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "red.png"
    draw_shape("red", "circle", random.Random(0), 48).save(path)
    return str(path)


@pytest.mark.slow
def test_interactive_session_in_a_terminal(run_pth, image, tmp_path):
    expected = load_chat_model(run_pth).chat([{"role": "user", "content": "<image>\nWhat is it?"}], [image],
                                             GenerationSettings(max_new_tokens=6, temperature=0.0)).text
    child = pexpect.spawn(sys.executable, ["-m", "llava_ft", "chat", run_pth, "--temperature", "0",
                                           "--max-new-tokens", "6"], encoding="utf-8", timeout=120,
                          dimensions=(40, 200))
    try:
        child.expect(r"text \+ images")
        child.expect_exact(">>> ")
        child.sendline(f"/image {tmp_path / 'missing.png'}")
        child.expect("error: image .*missing.png: no such file")  # one line, the session goes on
        child.expect_exact(">>> ")
        child.sendline(f"/image {image}")
        child.expect_exact("[image attached")
        child.expect_exact(">>> ")
        child.sendline("What is it?")
        child.expect_exact(expected.strip()[:10])
        child.expect_exact(">>> ")
        child.sendline("/reset")
        child.expect_exact("[conversation reset]")
        child.expect_exact(">>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_ctrl_d_leaves_cleanly(tiny_llama):
    child = pexpect.spawn(sys.executable, ["-m", "llava_ft", "chat", tiny_llama, "--prompt-template", "chatml"],
                          encoding="utf-8", timeout=120)
    try:
        child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


ENDLESS = 1_000_000  # context positions and max_new_tokens of the model whose answer cannot end


@pytest.fixture(scope="module")
def endless_llm(tmp_path_factory, tiny_llama):
    """tiny_llama whose answer can only be stopped from outside: its generation_config suppresses EOS and
    every token that could start chatml's stop word, and its context (so max_new_tokens) is a million."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from llava_ft.templates import get_template
    from llava_ft.testing.variants import with_context

    folder = Path(with_context(tiny_llama, tmp_path_factory.mktemp("endless") / "llm", ENDLESS))
    tok = AutoTokenizer.from_pretrained(str(folder))
    starts = {word[0] for word in get_template("chatml").stop_words}
    suppressed = sorted({tok.eos_token_id} | {i for i in range(len(tok))
                                              if any(c in tok.decode([i]) for c in starts)})
    cfg_file = folder / "generation_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    cfg_file.write_text(json.dumps({**cfg, "suppress_tokens": suppressed}))
    return str(folder)


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_not_the_session(endless_llm):
    # The answer cannot end by itself (no EOS, no stop word, a million tokens allowed): whatever the machine's
    # speed, Ctrl-C lands mid-answer, and only the CLI's handling of it brings the prompt back.
    child = pexpect.spawn(sys.executable, ["-m", "llava_ft", "chat", endless_llm, "--prompt-template", "chatml",
                                           "--temperature", "0", "--max-new-tokens", str(ENDLESS)],
                          encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect_exact(">>> ")
        child.sendline("Tell me everything.")
        child.expect(r"everything\.\r?\n")  # the echoed question
        child.expect(r"\S")  # the answer has started streaming
        child.sendintr()
        child.expect_exact("[answer stopped")
        child.expect_exact(">>> ")  # still in the session, history kept
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_prompt_mode_answers_each_prompt_and_exits(tiny_llama):
    settings = GenerationSettings(max_new_tokens=5, temperature=0.0)
    cm = load_chat_model(tiny_llama, prompt_template="chatml")
    first = cm.chat([{"role": "user", "content": "Hi"}], settings=settings).text
    second = cm.chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
                      {"role": "user", "content": "More?"}], settings=settings).text
    proc = subprocess.run([sys.executable, "-m", "llava_ft", "chat", tiny_llama, "--prompt-template", "chatml",
                           "--temperature", "0", "--max-new-tokens", "5", "--prompt", "Hi", "--prompt", "More?",
                           "--no-streamer"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-2:] == [first, second]


def test_bad_model_path_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llava_ft", "chat", str(tmp_path / "nope"), "--prompt", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no such file or folder" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, tiny_llama, tiny_clip):
    """A LLaVA run over tiny_llama with a 128-token context: the default --max-new-tokens 512 is past it."""
    from llava_ft.testing.variants import with_context

    root = tmp_path_factory.mktemp("short_run")
    raw = {"model": {"llm": with_context(tiny_llama, root / "llm", 128), "visual_encoder": tiny_clip,
                     "freeze_llm": True},
           "data": {"template": "chatml", "sources": [{"path": "unused.json"}]}}
    return write_random_checkpoint(root / "run", raw)


def test_short_context_caps_answers_and_names_flags(short_run, image, capsys):
    """The default --max-new-tokens (512) on a 128-token model: answers come, capped at context - prompt, with
    one notice; a prompt that alone fills the context names the numbers and what to change."""
    from llava_ft.cli import main

    cm = load_chat_model(short_run)
    ask = [{"role": "user", "content": "<image>\nWhat is it?"}]
    room = cm.context_length - cm.encode(ask, [image]).length
    expected = cm.chat(ask, [image], GenerationSettings(max_new_tokens=room, temperature=0.0)).text
    capsys.readouterr()
    code = main(["chat", short_run, "--image", image, "--temperature", "0", "--prompt", "What is it?",
                 "--prompt", "And the colour?", "--no-streamer"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "no room" not in out + err and "more than the model's context" not in out + err
    assert out.count("[answers are capped") == 1 and "--max-new-tokens 512" in out
    assert f"({room} tokens now" in out and expected.strip() in out

    words = "circle square " * 80
    assert main(["chat", short_run, "--prompt", words]) == 2
    out, err = capsys.readouterr()
    n = cm.encode([{"role": "user", "content": words}]).length
    assert f"the prompt is {n} tokens, and the model's context is 128 tokens" in err and "Traceback" not in err
    assert "--image" in err and "--system" in err
