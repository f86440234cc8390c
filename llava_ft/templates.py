"""Prompt templates with XTuner's semantics, under the names users type (`data.template`, `--prompt-template`).

A template wraps each conversation turn as XTuner does:

    turn 0:  SYSTEM.format(system) + INSTRUCTION.format(input, round)  [output + SUFFIX]  (EOS)  SEP
    turn k:                          INSTRUCTION.format(input, round)  [output + SUFFIX]  (EOS)  SEP

`[...]` is supervised; EOS follows an output unless `suffix_as_eos` (then SUFFIX already ends the turn).
The strings are data copied character for character from XTuner's `xtuner/utils/templates.py` so that a
user moving from XTuner trains on the same tokens; `chatml` is the plain ChatML layout (XTuner has none
under that name) and `phi3` is XTuner's `phi3_chat`. The name `hf` is not a Template: it means "use the
tokenizer's own chat template" and is handled by `llava_ft.data.encode` and inference.

Use:
    tpl = get_template("qwen_chat")
    tpl.format_instruction("Hi", 1)      # the text of a user turn; llava_ft.data.encode builds token ids
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Optional

from llava_ft.errors import UserError

HF_TEMPLATE = "hf"


@dataclass(frozen=True)
class Template:
    """One prompt template. `system`/`instruction` are format strings with `{system}` / `{input}`, `{round}`."""

    name: str
    system: str = ""
    instruction: str = "{input}"
    suffix: str = ""
    suffix_as_eos: bool = False
    sep: str = ""
    stop_words: tuple = field(default_factory=tuple)

    def format_system(self, text: Optional[str]) -> str:
        """The system block, or '' when there is no system text (XTuner skips SYSTEM then)."""
        if not text:
            return ""
        # Templates without a SYSTEM string fall back to '{system}\n' as XTuner's chat/eval hooks do.
        return (self.system or "{system}\n").format(system=text)

    def format_instruction(self, text: str, round_: int) -> str:
        return self.instruction.format(input=text, round=round_)


_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. {system}\n "
)
_LLAMA2_SYSTEM = (
    "[INST] <<SYS>>\n You are a helpful, respectful and honest assistant. Always answer as helpfully as "
    "possible, while being safe. Your answers should not include any harmful, unethical, racist, sexist, "
    "toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and "
    "positive in nature.\n{system}\n<</SYS>>\n [/INST] "
)
_DEEPSEEK_CODER_SYSTEM = (
    "You are an AI programming assistant, utilizing the DeepSeek Coder model, developed by DeepSeekCompany, and "
    "you only answer questions related to computer science. For politically sensitive questions, security and "
    "privacy issues, and other non-computer science questions, you will refuse to answer. {system}\n"
)
_CHATML = dict(
    system="<|im_start|>system\n{system}<|im_end|>\n",
    instruction="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
    suffix="<|im_end|>",
    suffix_as_eos=True,
    sep="\n",
)

_ALL = [
    Template("default", system="<|System|>:{system}\n", instruction="<|User|>:{input}\n<|Bot|>:", sep="\n"),
    Template("zephyr", system="<|system|>\n{system}\n", instruction="<|user|>\n{input}\n<|assistant|>\n",
             sep="\n"),
    Template("internlm_chat", system="<|System|>:{system}\n", instruction="<|User|>:{input}<eoh>\n<|Bot|>:",
             suffix="<eoa>", suffix_as_eos=True, sep="\n", stop_words=("<eoa>",)),
    Template("internlm2_chat", **_CHATML, stop_words=("<|im_end|>",)),
    Template("qwen_chat", **_CHATML, stop_words=("<|im_end|>", "<|endoftext|>")),
    Template("chatml", **_CHATML, stop_words=("<|im_end|>",)),
    Template("llama2_chat", system=_LLAMA2_SYSTEM, instruction="[INST] {input} [/INST]", sep="\n"),
    Template("llama3_chat",
             system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
             instruction=("<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
                          "<|start_header_id|>assistant<|end_header_id|>\n\n"),
             suffix="<|eot_id|>", suffix_as_eos=True, stop_words=("<|eot_id|>",)),
    Template("vicuna", system=_VICUNA_SYSTEM, instruction="USER: {input} ASSISTANT:", sep="\n"),
    Template("mistral", system="[INST] {system} [/INST]\n", instruction="[INST] {input} [/INST]", sep="\n"),
    Template("mixtral", system="[INST] {system} [/INST]\n", instruction="[INST] {input} [/INST]", sep="\n"),
    # `suffix_as_eos=False` for gemma is XTuner's choice: <end_of_turn> then EOS, both supervised.
    Template("gemma", system="<start_of_turn>system\n{system}<end_of_turn>\n",
             instruction="<start_of_turn>user\n{input}<end_of_turn>\n<start_of_turn>model\n",
             suffix="<end_of_turn>", suffix_as_eos=False, sep="\n", stop_words=("<end_of_turn>",)),
    Template("phi3", system="<|system|>\n{system}<|end|>\n", instruction="<|user|>\n{input}<|end|>\n<|assistant|>\n",
             suffix="<|end|>", suffix_as_eos=True, sep="\n", stop_words=("<|end|>",)),
    # The rest of XTuner's table, same strings and stop words (a key XTuner leaves out is our default).
    Template("chatglm2", system="{system}\n", instruction="[Round {round}]\n\n问：{input}\n\n答：", sep="\n\n"),
    Template("chatglm3", system="<|system|>\n{system}", instruction="<|user|>\n{input}<|assistant|>\n", sep="\n"),
    Template("baichuan_chat", system="{system}\n", instruction="<reserved_102>{input}<reserved_103>", sep="\n"),
    Template("baichuan2_chat", system="{system}\n", instruction="<reserved_106>{input}<reserved_107>", sep="\n"),
    Template("deepseek_coder", system=_DEEPSEEK_CODER_SYSTEM, instruction="### Instruction:\n{input}\n### Response:\n",
             sep="\n"),
    Template("deepseek_moe", system="[INST] {system} [/INST]\n", instruction="[INST] {input} [/INST]", sep="\n"),
    Template("deepseek_v2", system="{system}\n\n", instruction="User: {input}\n\nAssistant: ",
             suffix="<｜end▁of▁sentence｜>", suffix_as_eos=True, stop_words=("<｜end▁of▁sentence｜>",)),
    Template("cohere_chat", system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{system}<|END_OF_TURN_TOKEN|>",
             instruction=("<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{input}<|END_OF_TURN_TOKEN|>"
                          "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"),
             suffix="<|END_OF_TURN_TOKEN|>", suffix_as_eos=True, stop_words=("<|END_OF_TURN_TOKEN|>",)),
    # XTuner's minicpm has no SYSTEM string; a system text then uses the '{system}\n' fallback (format_system).
    Template("minicpm", instruction="<用户> {input} <AI>", sep="\n"),
    Template("minicpm3", **_CHATML, stop_words=("<|im_end|>", "<|endoftext|>")),
    Template("code_llama_chat", system="{system}\n", instruction="[INST] {input} [/INST]"),
    Template("wizardlm", system=_VICUNA_SYSTEM, instruction="USER: {input} ASSISTANT:", sep="\n"),
    Template("wizardcoder", system=("Below is an instruction that describes a task. Write a response that "
                                    "appropriately completes the request.\n\n{system}\n "),
             instruction="### Instruction:\n{input}\n\n### Response:", sep="\n\n"),
    Template("moss_sft", system="{system}\n", instruction="<|Human|>: {input}<eoh>\n", sep="\n",
             stop_words=("<eoc>", "<eom>")),
]

TEMPLATES: dict[str, Template] = {t.name: t for t in _ALL}
# XTuner spellings accepted too, so an XTuner config's prompt_template name works unchanged.
ALIASES = {"phi3_chat": "phi3", "deepseekcoder": "deepseek_coder"}


def template_names() -> list[str]:
    """Every valid `data.template` value, `hf` included."""
    return list(TEMPLATES) + [HF_TEMPLATE]


def get_template(name: str) -> Template:
    """The Template called `name` (aliases accepted). `hf` is not a Template: check for it before calling."""
    key = ALIASES.get(name, name)
    if key in TEMPLATES:
        return TEMPLATES[key]
    valid = template_names()
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.4)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UserError(f"unknown prompt template '{name}'; valid templates: {', '.join(valid)}.{hint}")


def conversation_turns(messages: list, system: Optional[str] = None) -> list[dict]:
    """Group messages into XTuner turns: {system, input, output (None = still to answer), loss, round}.

    Same grouping as XTuner's openai map fn: assistant messages at the very start of the list are
    skipped, consecutive user messages are joined, a system message applies to the next turn; `system`
    (the config's) applies to the first turn when the record brings none. An assistant message after the
    system prompt but before any user message (a greeting) is a turn of its own with an empty input, as in
    XTuner. A trailing user message becomes a turn with output None.
    """
    turns: list[dict] = []
    pending_system = system or ""
    pending_input: list[str] = []
    has_input = False
    at_start = True  # only assistant messages seen so far
    for msg in messages:
        role, content = msg["role"], msg["content"]
        if role == "assistant" and at_start:
            continue  # XTuner drops assistant messages only at the very start of the list
        at_start = False
        if role == "system":
            pending_system = content
        elif role == "user":
            pending_input.append(content)
            has_input = True
        elif role == "assistant":
            turns.append({"system": pending_system, "input": "".join(pending_input), "output": content,
                          "loss": bool(msg.get("loss", True)), "round": len(turns) + 1})
            pending_system, pending_input, has_input = "", [], False
        else:
            raise UserError(f"unknown message role {role!r}; expected system, user or assistant")
    if has_input:
        turns.append({"system": pending_system, "input": "".join(pending_input), "output": None,
                      "loss": False, "round": len(turns) + 1})
    return turns
