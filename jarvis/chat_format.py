"""The chat-format contract: how a list of chat messages becomes one prompt string.

A chat-format plugin registers `factory(model_info) -> ChatFormat`. `render`
receives messages already normalised by the HTTP layer (`{"role", "content"}`
with string content; OpenAI's `developer` role arrives as `system`) and returns
the prompt *without* the BOS token: the engine's tokenizer adds BOS, so a
template that starts with `{{ bos_token }}` is rendered with an empty one.
`stop` lists the strings that end an assistant turn in this format; they are
added to the request's own stop sequences.

Tools (`jarvis.tool_calls`): a format that knows its model's tool syntax sets
`tool_prompt(messages, tools, add_generation_prompt)` (messages in Hugging
Face's tool shape, tools as OpenAI `{"type": "function", "function": …}`) and
`tool_parser` (a factory of the parser of its calls). A format without them
serves tools through Jarvis's convention, rendered with its plain `render`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Messages = Sequence[Mapping[str, str]]


class ChatFormatError(ValueError):
    """The conversation cannot be rendered in this format (e.g. roles do not alternate)."""


@dataclass(frozen=True)
class ChatFormat:
    name: str
    render: Callable[[Messages, bool], str]
    stop: tuple[str, ...] = ()
    tool_prompt: Callable[[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]], bool], str] | None = None
    tool_parser: Callable[[], Any] | None = None

    def __call__(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        return self.render(messages, add_generation_prompt)
