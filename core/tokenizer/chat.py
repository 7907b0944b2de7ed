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


def named_chat_template(name_or_jinja: str) -> tuple[str, str]:
    """llama.cpp's --chat-template value: a built-in name or a jinja template -> (template,
    where it came from)."""
    builtin = {"chatml": CHATML, "gemma": GEMMA}
    if name_or_jinja in builtin:
        return builtin[name_or_jinja], f"built-in {name_or_jinja} (--chat-template)"
    if "{{" in name_or_jinja or "{%" in name_or_jinja:
        return name_or_jinja, "--chat-template"
    raise LlmkitError(
        f"unknown chat template {name_or_jinja!r} (built-in: chatml, gemma; or give a jinja "
        "template)"
    )


def chat_template(metadata: dict, arch: str, override: str | None = None) -> tuple[str, str]:
    """(template, where it came from): `override` (--chat-template), else the file's, else a
    built-in by architecture."""
    if override is not None:
        return named_chat_template(override)
    tpl = metadata.get("tokenizer.chat_template")
    if isinstance(tpl, str) and tpl.strip():
        return tpl, "gguf"
    if arch.startswith("gemma"):
        return GEMMA, "built-in gemma (file has no chat template)"
    return CHATML, "built-in chatml (file has no chat template)"


# Limits on what a template may do (it comes from a file, so it may be hostile): the text it
# writes, the ranges it loops over, the multiplications it asks for and the template lines it
# runs (a nested loop over small ranges still counts). Real chat templates stay far below each.
MAX_OUTPUT = 1 << 20  # characters of rendered text (and of any one string or list it builds)
MAX_RANGE = 10_000
MAX_STEPS = 2_000_000  # template lines executed


class _Budget:
    """Counts the template's executed lines (sys.settrace on its own frames only)."""

    def __init__(self):
        self.steps = 0

    def __call__(self, frame, event, arg):
        if frame.f_code.co_filename != "<template>":
            return None
        return self._line

    def _line(self, frame, event, arg):
        if event == "line":
            self.steps += 1
            if self.steps > MAX_STEPS:
                raise LlmkitError(f"chat template runs more than {MAX_STEPS} steps")
        return self._line


def _bounded(n: int) -> None:
    if n > MAX_OUTPUT:
        raise LlmkitError(f"chat template builds a value of {n} items (limit {MAX_OUTPUT})")


def _environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Limited(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+"])

        def call_binop(self, context, operator, left, right):
            if operator == "+" and isinstance(left, (str, list, tuple)):
                _bounded(len(left) + (len(right) if hasattr(right, "__len__") else 0))
            if operator == "*" and isinstance(right, int) and isinstance(left, (str, list, tuple)):
                _bounded(len(left) * right)
            if operator == "*" and isinstance(left, int) and isinstance(right, (str, list, tuple)):
                _bounded(len(right) * left)
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise LlmkitError("chat template raises a number to a power above 64")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
            _no_huge_ints(args, kwargs)  # str.center(10**9), zfill, ljust: refused before
            out = super().call(__context, __obj, *args, **kwargs)
            if isinstance(out, (str, list, tuple)):
                _bounded(len(out))
            return out

    def bounded_range(*args):
        r = range(*args)
        if len(r) > MAX_RANGE:
            raise LlmkitError(f"chat template loops over a range of {len(r)} (limit {MAX_RANGE})")
        return r

    env = Limited(trim_blocks=True, lstrip_blocks=True)
    env.globals["range"] = bounded_range
    for name, f in list(env.filters.items()):  # center / indent / wordwrap widths, batch sizes
        env.filters[name] = _guarded(f)
    return env


def _no_huge_ints(args, kwargs) -> None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_OUTPUT:
            raise LlmkitError(f"chat template passes {v} to a function (limit {MAX_OUTPUT})")


def _guarded(f):
    import functools

    @functools.wraps(f)
    def g(*args, **kwargs):
        _no_huge_ints(args, kwargs)
        out = f(*args, **kwargs)
        if isinstance(out, (str, list, tuple)):
            _bounded(len(out))
        return out

    return g


def _bounded_join(parts) -> str:
    out, n = [], 0
    for p in parts:
        p = str(p)
        n += len(p)
        _bounded(n)
        out.append(p)
    return "".join(out)


def render_chat(
    template: str,
    messages: list[dict],
    bos: str = "",
    eos: str = "",
    add_generation_prompt: bool = True,
    tools: list | None = None,
) -> str:
    """The conversation rendered by `template` in a sandbox with the limits above: any failure
    or excess is an LlmkitError naming it (never a hang, a recursion crash or a huge string).
    `tools` (OpenAI-shaped) becomes the template's `tools` variable, as llama.cpp --jinja does."""
    import sys

    from jinja2 import TemplateError

    def raise_exception(msg):
        raise LlmkitError(f"chat template error: {msg}")

    env = _environment()
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    budget, previous = _Budget(), sys.gettrace()
    try:
        tmpl = env.from_string(template)
        # `~` joins strings with str_join from the compiled module's namespace: bound it too
        tmpl.root_render_func.__globals__["str_join"] = _bounded_join
        tmpl.root_render_func.__globals__["markup_join"] = _bounded_join
        sys.settrace(budget)
        out, n = [], 0
        for piece in tmpl.generate(
            messages=messages, bos_token=bos, eos_token=eos,
            add_generation_prompt=add_generation_prompt, **({"tools": tools} if tools else {}),
        ):  # fmt: skip
            n += len(piece)
            _bounded(n)
            out.append(piece)
        return "".join(out)
    except TemplateError as e:
        raise LlmkitError(f"chat template error: {e}") from None
    except RecursionError:
        raise LlmkitError("chat template recurses too deeply") from None
    except MemoryError:
        raise LlmkitError("chat template exhausts memory") from None
    except LlmkitError:
        raise
    except Exception as e:  # the template's own arithmetic or lookups (1 / 0, a bad index)
        raise LlmkitError(f"chat template error: {type(e).__name__}: {e}") from None
    finally:
        sys.settrace(previous)


class ChatFormat:
    """The model's chat format: the GGUF's template, or the built-in one when the file has none
    or its template fails (then once more with the built-in, and a warning in `warnings`)."""

    def __init__(self, metadata: dict, arch: str, bos: str = "", eos: str = ""):
        self.template, self.source = chat_template(metadata, arch)
        self.builtin = GEMMA if arch.startswith("gemma") else CHATML
        self.bos, self.eos = bos, eos
        self.warnings: list[str] = []

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return render_chat(self.template, messages, self.bos, self.eos, add_generation_prompt)
        except LlmkitError as e:
            if self.template == self.builtin:
                raise
            name = "gemma" if self.builtin == GEMMA else "chatml"
            self.warnings.append(f"{e}; using the built-in {name} chat format instead")
            self.template, self.source = (
                self.builtin,
                f"built-in {name} (the file's template failed)",
            )
            return render_chat(self.template, messages, self.bos, self.eos, add_generation_prompt)
