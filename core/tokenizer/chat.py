"""Chat templates: the GGUF's `tokenizer.chat_template` rendered with sandboxed jinja2.

When a file carries no template, llama.cpp falls back to ChatML; for Gemma models we use Gemma's own
turn format instead, since that is what those weights were trained on (the fallback is reported).
"""

from __future__ import annotations

from datetime import datetime

from llmkit.errors import LlmkitError

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma: no system role; a system message is prepended to the first user turn.
GEMMA = (
    "{{ bos_token }}{% set ns = namespace(sys='', first=true) %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.sys = m['content'] + '\n\n' %}"
    "{% else %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (ns.sys if ns.first else '') + m['content'] | trim"
    " + '<end_of_turn>\n' }}{% set ns.first = false %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def chat_template(metadata: dict, arch: str) -> tuple[str, str]:
    """(template, where it came from)."""
    tpl = metadata.get("tokenizer.chat_template")
    if isinstance(tpl, str) and tpl.strip():
        return tpl, "gguf"
    if arch.startswith("gemma"):
        return GEMMA, "built-in gemma (file has no chat template)"
    return CHATML, "built-in chatml (file has no chat template)"


def render_chat(
    template: str,
    messages: list[dict],
    bos: str = "",
    eos: str = "",
    add_generation_prompt: bool = True,
) -> str:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise LlmkitError(f"chat template error: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=messages,
            bos_token=bos,
            eos_token=eos,
            add_generation_prompt=add_generation_prompt,
        )
    except TemplateError as e:
        raise LlmkitError(f"chat template error: {e}") from None
