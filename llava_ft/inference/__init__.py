"""Inference over any trained artifact: one loader, one ChatModel; chat, eval and serve build on it.

    from llava_ft.inference import load_chat_model, GenerationSettings
    cm = load_chat_model("work_dirs/run")                    # or a converted / merged / llava-hf folder
    for delta in cm.stream_chat([{"role": "user", "content": "Hi"}]):
        print(delta, end="", flush=True)
    result = cm.chat(messages, images=["cat.png"], settings=GenerationSettings(max_new_tokens=32))

See docs/architecture.md (Inference) for the contract.
"""
from llava_ft.inference.artifacts import Artifact, detect_artifact
from llava_ft.inference.chat_model import (ChatModel, ChatResult, ChatStream, ContextLengthError,
                                           FittedConversation, GenerationSettings)
from llava_ft.inference.loader import build_from_checkpoint, load_chat_model

# `llava_ft/__init__.py` names this `load_model`; both spellings work.
load_model = load_chat_model

__all__ = ["Artifact", "ChatModel", "ChatResult", "ChatStream", "ContextLengthError", "FittedConversation",
           "GenerationSettings", "build_from_checkpoint", "detect_artifact", "load_chat_model", "load_model"]
