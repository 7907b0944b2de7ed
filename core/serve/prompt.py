"""Messages / text -> prompt token ids, with the GGUF's chat template (jinja2)."""

from __future__ import annotations

from llmkit.core.tokenizer.chat import chat_template, render_chat


class Prompter:
    def __init__(self, lm, tokenizer, template: str | None = None):
        self.tok = tokenizer
        self.template, self.template_source = chat_template(lm.metadata, lm.arch, template)
        t = tokenizer
        self.bos = t.id_to_text(t.bos_id) if t.bos_id is not None else ""
        self.eos = t.id_to_text(t.eos_id) if t.eos_id is not None else ""

    def text(self, s: str) -> list[int]:
        return self.tok.encode(s, add_special=True, parse_special=True)

    def detokenize(self, ids: list[int]) -> str:
        return self.tok.decode(ids)  # llama_detokenize: SPM's leading space removed

    def render(self, messages: list[dict], tools: list | None = None) -> str:
        """messages -> the conversation as the chat template writes it (the assistant's turn
        opened); `tools` is the template's `tools` variable (core/tools.py)."""
        return render_chat(
            self.template, messages, self.bos, self.eos, add_generation_prompt=True, tools=tools
        )

    def chat(self, messages: list[dict], tools: list | None = None) -> list[int]:
        """messages: [{"role", "content": str}] -> ids of the rendered conversation, ready for
        the assistant's turn."""
        text = self.render(messages, tools)
        ids = self.tok.encode(text, add_special=True, parse_special=True)
        if len(ids) > 1 and ids[0] == ids[1] == self.tok.bos_id:
            ids = ids[1:]  # the template already wrote BOS
        return ids
