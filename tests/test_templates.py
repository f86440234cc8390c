"""Golden tests: per template, the exact text/tokens we train on and which spans carry loss (XTuner 0.2 rules)."""
import pytest
from transformers import AutoTokenizer

from llava_ft import IGNORE_INDEX
from llava_ft.data.encode import encode_prompt, encode_record
from llava_ft.errors import UserError
from llava_ft.templates import TEMPLATES, get_template, template_names

USER_NAMES = ["default", "internlm2_chat", "internlm_chat", "qwen_chat", "llama2_chat", "llama3_chat", "vicuna",
              "zephyr", "mistral", "mixtral", "gemma", "phi3", "chatml"]
# XTuner's other template names (issue 14): every one must be accepted and encode by XTuner's rules.
XTUNER_MORE = ["chatglm2", "chatglm3", "baichuan_chat", "baichuan2_chat", "deepseek_coder", "deepseek_moe",
               "deepseek_v2", "cohere_chat", "minicpm", "minicpm3", "code_llama_chat", "wizardlm", "wizardcoder",
               "moss_sft"]
USER_NAMES += XTUNER_MORE

RECORD = {"id": "r1", "images": [], "messages": [
    {"role": "system", "content": "Be kind.", "loss": True},
    {"role": "user", "content": "Hi there", "loss": True},
    {"role": "assistant", "content": "Hello friend", "loss": True},
    {"role": "user", "content": "Bye", "loss": True},
    {"role": "assistant", "content": "See you", "loss": True},
]}


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return AutoTokenizer.from_pretrained(tiny_tokenizer)


def spans(ids, labels):
    """Contiguous runs of supervised positions, as lists of ids."""
    out, cur = [], []
    for i, lab in zip(ids, labels):
        if lab == IGNORE_INDEX:
            if cur:
                out.append(cur)
            cur = []
        else:
            assert lab == i, "a supervised label must equal its input id"
            cur.append(i)
    return out + ([cur] if cur else [])


def test_all_user_names_exist_and_hf_is_valid():
    assert set(USER_NAMES) <= set(TEMPLATES)
    assert "hf" in template_names()
    assert get_template("phi3_chat") is get_template("phi3")


def test_unknown_template_lists_choices():
    with pytest.raises(UserError) as err:
        get_template("qwen_chatt")
    assert "qwen_chat" in str(err.value) and "llama3_chat" in str(err.value) and "hf" in str(err.value)


# Exact rendered text (XTuner's strings); </s> is the tiny tokenizer's EOS, <s> its BOS.
GOLDEN_TEXT = {
    "default": "<s><|System|>:Be kind.\n<|User|>:Hi there\n<|Bot|>:Hello friend</s>\n<s><|User|>:Bye\n<|Bot|>:See you</s>\n",
    "qwen_chat": ("<s><|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
                  "Hello friend<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nSee you<|im_end|>\n"),
    "llama3_chat": ("<s><|start_header_id|>system<|end_header_id|>\n\nBe kind.<|eot_id|><|start_header_id|>user"
                    "<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello friend"
                    "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant"
                    "<|end_header_id|>\n\nSee you<|eot_id|>"),
    "gemma": ("<s><start_of_turn>system\nBe kind.<end_of_turn>\n<start_of_turn>user\nHi there<end_of_turn>\n"
              "<start_of_turn>model\nHello friend<end_of_turn></s>\n<s><start_of_turn>user\nBye<end_of_turn>\n"
              "<start_of_turn>model\nSee you<end_of_turn></s>\n"),
    "mistral": "<s>[INST] Be kind. [/INST]\n[INST] Hi there [/INST]Hello friend</s>\n<s>[INST] Bye [/INST]See you</s>\n",
    "vicuna": ("<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
               "detailed, and polite answers to the user's questions. Be kind.\n USER: Hi there ASSISTANT:Hello friend</s>\n"
               "<s>USER: Bye ASSISTANT:See you</s>\n"),
    "internlm_chat": ("<s><|System|>:Be kind.\n<|User|>:Hi there<eoh>\n<|Bot|>:Hello friend<eoa>\n"
                      "<|User|>:Bye<eoh>\n<|Bot|>:See you<eoa>\n"),
    "phi3": ("<s><|system|>\nBe kind.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\nHello friend<|end|>\n"
             "<|user|>\nBye<|end|>\n<|assistant|>\nSee you<|end|>\n"),
    "zephyr": "<s><|system|>\nBe kind.\n<|user|>\nHi there\n<|assistant|>\nHello friend</s>\n<s><|user|>\nBye\n<|assistant|>\nSee you</s>\n",
    "chatglm2": "<s>Be kind.\n[Round 1]\n\n问：Hi there\n\n答：Hello friend</s>\n\n<s>[Round 2]\n\n问：Bye\n\n答：See you</s>\n\n",
    "chatglm3": "<s><|system|>\nBe kind.<|user|>\nHi there<|assistant|>\nHello friend</s>\n<s><|user|>\nBye<|assistant|>\nSee you</s>\n",
    "baichuan_chat": ("<s>Be kind.\n<reserved_102>Hi there<reserved_103>Hello friend</s>\n"
                      "<s><reserved_102>Bye<reserved_103>See you</s>\n"),
    "baichuan2_chat": ("<s>Be kind.\n<reserved_106>Hi there<reserved_107>Hello friend</s>\n"
                       "<s><reserved_106>Bye<reserved_107>See you</s>\n"),
    "deepseek_coder": ("<s>You are an AI programming assistant, utilizing the DeepSeek Coder model, developed by "
                       "DeepSeekCompany, and you only answer questions related to computer science. For politically "
                       "sensitive questions, security and privacy issues, and other non-computer science questions, "
                       "you will refuse to answer. Be kind.\n### Instruction:\nHi there\n### Response:\nHello friend"
                       "</s>\n<s>### Instruction:\nBye\n### Response:\nSee you</s>\n"),
    "deepseek_moe": "<s>[INST] Be kind. [/INST]\n[INST] Hi there [/INST]Hello friend</s>\n<s>[INST] Bye [/INST]See you</s>\n",
    "deepseek_v2": ("<s>Be kind.\n\nUser: Hi there\n\nAssistant: Hello friend<｜end▁of▁sentence｜>User: Bye\n\n"
                    "Assistant: See you<｜end▁of▁sentence｜>"),
    "cohere_chat": ("<s><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be kind.<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>"
                    "<|USER_TOKEN|>Hi there<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hello friend"
                    "<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Bye<|END_OF_TURN_TOKEN|>"
                    "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>See you<|END_OF_TURN_TOKEN|>"),
    "minicpm": "<s>Be kind.\n<用户> Hi there <AI>Hello friend</s>\n<s><用户> Bye <AI>See you</s>\n",
    "minicpm3": ("<s><|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
                 "Hello friend<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nSee you<|im_end|>\n"),
    "code_llama_chat": "<s>Be kind.\n[INST] Hi there [/INST]Hello friend</s><s>[INST] Bye [/INST]See you</s>",
    "wizardlm": ("<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                 "detailed, and polite answers to the user's questions. Be kind.\n USER: Hi there ASSISTANT:Hello friend"
                 "</s>\n<s>USER: Bye ASSISTANT:See you</s>\n"),
    "wizardcoder": ("<s>Below is an instruction that describes a task. Write a response that appropriately completes "
                    "the request.\n\nBe kind.\n ### Instruction:\nHi there\n\n### Response:Hello friend</s>\n\n"
                    "<s>### Instruction:\nBye\n\n### Response:See you</s>\n\n"),
    "moss_sft": "<s>Be kind.\n<|Human|>: Hi there<eoh>\nHello friend</s>\n<s><|Human|>: Bye<eoh>\nSee you</s>\n",
}

# XTuner's STOP_WORDS (an empty list where XTuner gives none): generation stops on these.
XTUNER_STOP_WORDS = {
    "chatglm2": (), "chatglm3": (), "baichuan_chat": (), "baichuan2_chat": (), "deepseek_coder": (),
    "deepseek_moe": (), "deepseek_v2": ("<｜end▁of▁sentence｜>",), "cohere_chat": ("<|END_OF_TURN_TOKEN|>",),
    "minicpm": (), "minicpm3": ("<|im_end|>", "<|endoftext|>"), "code_llama_chat": (), "wizardlm": (),
    "wizardcoder": (), "moss_sft": ("<eoc>", "<eom>"),
}


@pytest.mark.parametrize("name", XTUNER_MORE)
def test_xtuner_stop_words(name):
    assert get_template(name).stop_words == XTUNER_STOP_WORDS[name]


@pytest.mark.parametrize("alias,name", [("deepseekcoder", "deepseek_coder"), ("phi3_chat", "phi3")])
def test_xtuner_spellings_accepted_in_configs(tok, alias, name):
    from llava_ft.config import config_from_dict

    assert get_template(alias) is get_template(name)
    cfg = config_from_dict({"model": {"llm": "x"}, "data": {"template": alias, "sources": [{"path": "a.json"}]}})
    assert encode_record(RECORD, tok, cfg.data.template, 4096).sample == encode_record(RECORD, tok, name, 4096).sample


@pytest.mark.parametrize("name", sorted(GOLDEN_TEXT))
def test_golden_text(tok, name):
    sample = encode_record(RECORD, tok, name, max_length=4096).sample
    assert tok.decode(sample["input_ids"]) == GOLDEN_TEXT[name]


@pytest.mark.parametrize("name", USER_NAMES)
def test_loss_only_on_answers_suffix_and_eos(tok, name):
    tpl = get_template(name)
    sample = encode_record(RECORD, tok, name, max_length=4096).sample
    got = [tok.decode(s) for s in spans(sample["input_ids"], sample["labels"])]
    eos = "" if tpl.suffix_as_eos else tok.eos_token
    # Each answer's span is answer + SUFFIX (+ EOS): system, user text, BOS and SEP never have loss.
    assert "".join(got) == f"Hello friend{tpl.suffix}{eos}See you{tpl.suffix}{eos}"
    # BOS at start and after every EOS (XTuner): 2 when EOS ends turns, 1 when SUFFIX is the EOS.
    assert sample["input_ids"][0] == tok.bos_token_id
    assert sample["input_ids"].count(tok.bos_token_id) == (1 if tpl.suffix_as_eos else 2)
    assert sample["length"] == len(sample["input_ids"]) and sample["modality_length"] == -sample["length"]


@pytest.mark.parametrize("name", USER_NAMES)
def test_segments_tokenized_on_their_own(tok, name):
    """XTuner tokenizes prompt, answer(+suffix) and SEP separately; ids equal that concatenation."""
    tpl = get_template(name)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos, eos = [tok.bos_token_id], [tok.eos_token_id]
    sep = enc(tpl.sep) if tpl.sep else []
    expected = bos + enc(tpl.format_system("Be kind.") + tpl.format_instruction("Hi there", 1))
    expected += enc("Hello friend" + tpl.suffix) + ([] if tpl.suffix_as_eos else eos) + sep
    expected += ([] if tpl.suffix_as_eos else bos) + enc(tpl.format_instruction("Bye", 2))
    expected += enc("See you" + tpl.suffix) + ([] if tpl.suffix_as_eos else eos) + sep
    assert encode_record(RECORD, tok, name, max_length=4096).sample["input_ids"] == expected


@pytest.mark.parametrize("name", USER_NAMES + ["hf"])
def test_generation_prompt_is_training_prefix(tok, name):
    """The ids inference feeds are exactly the training ids up to where the last answer starts."""
    train_ids = encode_record(RECORD, tok, name, max_length=4096).sample["input_ids"]
    prompt_ids = encode_prompt(RECORD["messages"][:-1], tok, name)
    assert train_ids[:len(prompt_ids)] == prompt_ids
    answer = tok.decode(train_ids[len(prompt_ids):])
    assert answer.startswith("See you")


def test_config_system_applies_when_record_has_none(tok):
    rec = {"id": "x", "images": [], "messages": RECORD["messages"][1:3]}
    text = tok.decode(encode_record(rec, tok, "default", 4096, system="SYS").sample["input_ids"])
    assert text.startswith("<s><|System|>:SYS\n<|User|>:Hi there")
    # The record's own system message wins over the config's.
    text = tok.decode(encode_record(RECORD, tok, "default", 4096, system="SYS").sample["input_ids"])
    assert "SYS" not in text and "Be kind." in text


def test_hf_template_supervises_assistant_spans(tok):
    sample = encode_record(RECORD, tok, "hf", 4096).sample
    got = [tok.decode(s) for s in spans(sample["input_ids"], sample["labels"])]
    assert got == ["Hello friend<|im_end|>\n", "See you<|im_end|>\n"]
