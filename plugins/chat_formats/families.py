"""Hand-written chat formats of the model families Jarvis knows: ChatML, Llama 3, Mistral, Gemma.

Each `render_*` reproduces its family's official chat template (tests compare
them against the upstream Jinja text) without the BOS token, which the
engine's tokenizer adds. Where a template rejects a conversation, the render
raises `ChatFormatError` with the template's own message.
"""

from __future__ import annotations

from jarvis.chat_format import ChatFormat, ChatFormatError, Messages

ALTERNATION_ERROR = "Conversation roles must alternate user/assistant/user/assistant/..."


def render_chatml(messages: Messages, add_generation_prompt: bool) -> str:
    """ChatML as in OpenHermes / Qwen (without Qwen's default system prompt)."""
    prompt = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return prompt + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def render_llama3(messages: Messages, add_generation_prompt: bool) -> str:
    """Meta-Llama-3-Instruct: header-delimited turns, content trimmed."""
    prompt = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
                     for m in messages)
    return prompt + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


def render_mistral(messages: Messages, add_generation_prompt: bool) -> str:
    """Mistral-7B-Instruct-v0.1: `[INST] user [/INST]assistant</s>`, strictly alternating.

    The official v0.1 template rejects system messages; here a leading one is
    prepended, followed by a blank line, to the first user message (as later
    Mistral templates do). The generation prompt is implicit: a conversation
    ending in a user turn already ends with `[/INST]`, so the flag changes nothing.
    """
    system_prefix, turns = _split_leading_system(messages)
    parts = []
    for index, message in enumerate(turns):
        _check_alternation(index, message["role"])
        if message["role"] == "user":
            parts.append(f"[INST] {system_prefix if index == 0 else ''}{message['content']} [/INST]")
        elif message["role"] == "assistant":
            parts.append(f"{message['content']}</s>")
        else:
            raise ChatFormatError("Only user and assistant roles are supported!")
    return "".join(parts)


def render_gemma(messages: Messages, add_generation_prompt: bool) -> str:
    """Gemma 3 instruct: a leading system message opens the first user turn; assistant is `model`."""
    system_prefix, turns = _split_leading_system(messages)
    parts = []
    for index, message in enumerate(turns):
        _check_alternation(index, message["role"])
        role = "model" if message["role"] == "assistant" else message["role"]
        prefix = system_prefix if index == 0 else ""
        parts.append(f"<start_of_turn>{role}\n{prefix}{message['content'].strip()}<end_of_turn>\n")
    return "".join(parts) + ("<start_of_turn>model\n" if add_generation_prompt else "")


def _split_leading_system(messages: Messages) -> tuple[str, Messages]:
    """The first user turn's prefix (a leading system message and a blank line) and the other messages."""
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"] + "\n\n", messages[1:]
    return "", messages


def _check_alternation(index: int, role: str) -> None:
    """The official templates' check: even positions are user turns, odd ones are not."""
    if (role == "user") != (index % 2 == 0):
        raise ChatFormatError(ALTERNATION_ERROR)


CHATML = ChatFormat("chatml", render_chatml, ("<|im_end|>",))
LLAMA3 = ChatFormat("llama3", render_llama3, ("<|eot_id|>",))
MISTRAL = ChatFormat("mistral", render_mistral, ("</s>",))
GEMMA = ChatFormat("gemma", render_gemma, ("<end_of_turn>",))

FAMILIES: dict[str, ChatFormat] = {f.name: f for f in (CHATML, LLAMA3, MISTRAL, GEMMA)}
