"""The built-in chat formats render exactly what each family's official template renders."""

from __future__ import annotations

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jarvis.chat_format import ChatFormat, ChatFormatError
from jarvis.engine import ModelInfo
from jarvis.plugins.chat_formats import jarvis_register_chat_formats
from jarvis.plugins.chat_formats.auto import auto_format
from jarvis.plugins.chat_formats.families import CHATML, GEMMA, LLAMA3, MISTRAL

# Upstream chat templates, verbatim.

# teknium/OpenHermes-2.5-Mistral-7B (ChatML; Qwen's adds a default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# mistralai/Mistral-7B-Instruct-v0.1
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# google/gemma-3-*-it
GEMMA_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


class TemplateRaised(Exception):
    pass


def raise_exception(message):
    raise TemplateRaised(message)


def reference(template: str, messages, add_generation_prompt: bool) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token="", eos_token="</s>",
        raise_exception=raise_exception)


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def system(content):
    return {"role": "system", "content": content}


CONVERSATIONS = {
    "single-user": [user("Hello!")],
    "system-user": [system("You are terse."), user("What is 2+2?")],
    "multi-turn": [user("Hi"), assistant("Hello, how can I help?"), user("Tell me a joke.")],
    "ends-with-assistant": [user("Hi"), assistant("Hello.")],
    "system-multi-turn": [system("Be kind."), user("Hi"), assistant("Hey"), user("Bye")],
    "whitespace": [system("  Sys  \n"), user("\n  padded question \t"), assistant("  spaced answer \n"),
                   user("  again ")],
    "multiline": [user("line one\nline two\n\nline four"), assistant("a\nb"), user("ok")],
}
WITH_SYSTEM = {name for name, conversation in CONVERSATIONS.items() if conversation[0]["role"] == "system"}

CASES = [
    pytest.param(chat_format, template, name, gen, id=f"{chat_format.name}-{name}-{'gen' if gen else 'nogen'}")
    for chat_format, template in [(CHATML, CHATML_TEMPLATE), (LLAMA3, LLAMA3_TEMPLATE),
                                  (MISTRAL, MISTRAL_TEMPLATE), (GEMMA, GEMMA_TEMPLATE)]
    for name in CONVERSATIONS
    if not (chat_format is MISTRAL and name in WITH_SYSTEM)  # v0.1's template rejects system messages
    for gen in (True, False)
]


@pytest.mark.parametrize(("chat_format", "template", "conversation", "add_generation_prompt"), CASES)
def test_a_family_renders_what_its_official_template_renders(chat_format, template, conversation,
                                                              add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    assert chat_format(messages, add_generation_prompt) == reference(template, messages, add_generation_prompt)


def test_the_references_are_not_trivially_equal():
    """Guards the comparison above: the families really differ and trimming really happens."""
    messages = CONVERSATIONS["whitespace"][1:]
    outputs = {f.name: f(messages, True) for f in (CHATML, LLAMA3, MISTRAL, GEMMA)}
    assert len(set(outputs.values())) == 4
    assert "\n  padded question \t" in outputs["chatml"]
    assert "padded question<|eot_id|>" in outputs["llama3"]
    assert outputs["gemma"].startswith("<start_of_turn>user\npadded question<end_of_turn>\n")


def test_exact_prompts_for_one_conversation():
    messages = [system("S"), user(" Q "), assistant("A"), user("Q2")]
    assert CHATML(messages) == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n Q <|im_end|>\n"
                                "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
                                "<|im_start|>assistant\n")
    assert LLAMA3(messages) == ("<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
                                "<|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
                                "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>"
                                "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
                                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert GEMMA(messages) == ("<start_of_turn>user\nS\n\nQ<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n"
                               "<start_of_turn>user\nQ2<end_of_turn>\n<start_of_turn>model\n")


def test_mistral_prepends_a_system_message_to_the_first_user_turn():
    messages = [system("You are terse."), user("Hi"), assistant("Hello"), user("Bye")]
    assert MISTRAL(messages) == "[INST] You are terse.\n\nHi [/INST]Hello</s>[INST] Bye [/INST]"
    # The same as the official template given the system text already inside the first user message.
    folded = [user("You are terse.\n\nHi"), assistant("Hello"), user("Bye")]
    assert MISTRAL(messages) == reference(MISTRAL_TEMPLATE, folded, True)


def test_stop_sequences():
    assert CHATML.stop == ("<|im_end|>",)
    assert LLAMA3.stop == ("<|eot_id|>",)
    assert MISTRAL.stop == ("</s>",)
    assert GEMMA.stop == ("<end_of_turn>",)


REJECTED = {
    "two-users": [user("a"), user("b")],
    "starts-with-assistant": [assistant("a"), user("b")],
    "two-assistants": [user("a"), assistant("b"), assistant("c")],
    "system-then-assistant": [system("s"), assistant("a")],
    "system-in-the-middle": [user("a"), assistant("b"), system("s")],
}


@pytest.mark.parametrize("conversation", REJECTED)
@pytest.mark.parametrize(("chat_format", "template"), [(MISTRAL, MISTRAL_TEMPLATE), (GEMMA, GEMMA_TEMPLATE)],
                         ids=["mistral", "gemma"])
def test_non_alternating_roles_are_rejected_like_the_official_template(chat_format, template, conversation):
    messages = REJECTED[conversation]
    with pytest.raises(TemplateRaised) as official:
        reference(template, messages, True)
    with pytest.raises(ChatFormatError) as ours:
        chat_format(messages, True)
    assert str(ours.value) == str(official.value) == (
        "Conversation roles must alternate user/assistant/user/assistant/...")


def test_mistral_rejects_a_tool_turn_with_the_official_message():
    messages = [user("a"), {"role": "tool", "content": "42"}]
    with pytest.raises(TemplateRaised, match="Only user and assistant roles are supported!"):
        reference(MISTRAL_TEMPLATE, messages, True)
    with pytest.raises(ChatFormatError, match="Only user and assistant roles are supported!"):
        MISTRAL(messages, True)


# auto

def model(chat_template=None, architecture=None, eos_token=""):
    return ModelInfo(id="m", max_model_len=4096, chat_template=chat_template, architecture=architecture,
                     eos_token=eos_token)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_auto_renders_the_models_own_template(conversation):
    chat_format = auto_format(model(CHATML_TEMPLATE, eos_token="<|endoftext|>"))
    messages = CONVERSATIONS[conversation]
    assert chat_format.name == "auto"
    assert chat_format(messages, True) == CHATML(messages, True)
    assert chat_format(messages, False) == CHATML(messages, False)
    assert chat_format.stop == ("<|endoftext|>", "<|im_end|>")


def test_auto_renders_gemma3s_template_like_the_gemma_format():
    chat_format = auto_format(model(GEMMA_TEMPLATE, architecture="gemma3", eos_token="<eos>"))
    messages = CONVERSATIONS["whitespace"]
    assert chat_format(messages, True) == GEMMA(messages, True)
    assert chat_format.stop == ("<eos>", "<end_of_turn>")


def test_auto_passes_eos_and_an_empty_bos():
    chat_format = auto_format(model("{{ bos_token }}[{{ messages[0].content }}]{{ eos_token }}", eos_token="</s>"))
    assert chat_format([user("x")], True) == "[x]</s>"
    assert chat_format.stop == ("</s>",)


def test_auto_without_eos_or_known_marker_has_no_stop():
    assert auto_format(model("{% for m in messages %}{{ m.content }}{% endfor %}")).stop == ()


def test_auto_template_helpers_match_hugging_face():
    template = "{{ strftime_now('%Y') }}|{{ messages | tojson }}{% for m in messages %}{% break %}{% endfor %}"
    rendered = auto_format(model(template))([user("<é>")], True)
    year, payload = rendered.split("|")
    assert year.isdigit() and len(year) == 4
    assert payload == '[{"role": "user", "content": "<é>"}]'


@pytest.mark.parametrize(("architecture", "family"), [
    ("gemma3", GEMMA), ("gemma", GEMMA), ("llama", LLAMA3), ("mistral", MISTRAL), ("qwen2", CHATML),
    ("Qwen3", CHATML),
])
def test_auto_without_a_template_guesses_the_family_from_the_architecture(architecture, family):
    chat_format = auto_format(model(architecture=architecture))
    messages = CONVERSATIONS["multi-turn"]
    assert chat_format.name == f"auto({family.name})"
    assert chat_format(messages, True) == family(messages, True)
    assert chat_format.stop == family.stop


@pytest.mark.parametrize("architecture", [None, "", "phi3", "rwkv6"])
def test_auto_without_a_template_or_a_known_architecture_refuses_to_render(architecture):
    chat_format = auto_format(model(architecture=architecture))
    with pytest.raises(ChatFormatError, match="the model has no chat template; set JARVIS_CHAT_FORMAT to one of "
                                              "chatml, gemma, llama3, mistral"):
        chat_format([user("hi")], True)


def test_auto_surfaces_raise_exception_as_a_chat_format_error():
    chat_format = auto_format(model(MISTRAL_TEMPLATE, eos_token="</s>"))
    assert chat_format([user("a"), assistant("b")], True) == "[INST] a [/INST]b</s>"
    with pytest.raises(ChatFormatError, match=r"^Conversation roles must alternate user/assistant/\S+/\.\.\.$"):
        chat_format([user("a"), user("b")], True)


def test_auto_surfaces_jinja_errors_as_chat_format_errors():
    undefined = auto_format(model("{{ messages[0].nonexistent.deeper }}"))
    with pytest.raises(ChatFormatError, match="nonexistent"):
        undefined([user("a")], True)
    unsafe = auto_format(model("{{ messages.append(1) }}"))
    with pytest.raises(ChatFormatError, match="append"):
        unsafe([user("a")], True)
    broken = auto_format(model("{% for m in messages %}{{ m.content }}"))
    assert isinstance(broken, ChatFormat)
    with pytest.raises(ChatFormatError, match="does not compile"):
        broken([user("a")], True)


def test_the_hook_registers_every_format():
    registered = {}
    jarvis_register_chat_formats(register=lambda name, factory: registered.setdefault(name, factory))
    assert set(registered) == {"chatml", "llama3", "mistral", "gemma", "auto"}
    info = model(architecture="gemma3")
    formats = {name: factory(info) for name, factory in registered.items()}
    assert all(isinstance(f, ChatFormat) for f in formats.values())
    assert {name: f.name for name, f in formats.items()} == {
        "chatml": "chatml", "llama3": "llama3", "mistral": "mistral", "gemma": "gemma", "auto": "auto(gemma)"}
