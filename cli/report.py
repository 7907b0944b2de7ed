"""What `llm run` prints around generation: the memory plan, llama.cpp-style timings (stderr) and
the chat loop's turns."""

from __future__ import annotations

import sys
import time

from llmkit.cli.common import eprint


def print_plan(llm) -> None:
    lm, plan = llm.lm, llm.memory_plan()
    eprint(
        f"model: {lm.path} ({lm.describe()}, {lm.n_params() / 1e6:.2f} M params, "
        f"loaded in {lm.load_seconds:.2f} s)"
    )
    eprint(f"weights: {plan['weights_bytes'] / 2**20:.2f} MiB in the GGUF (mmapped)")
    for t, v in plan["weights_by_type"].items():
        eprint(f"  {t:<7} {v['tensors']:4d} tensors {v['bytes'] / 2**20:9.2f} MiB")
    eprint(
        f"backend: {lm.backend.device.type}, weights prepared as {plan['backend_weight_dtype']}: "
        f"{plan['backend_extra_bytes'] / 2**20:.2f} MiB"
    )
    for ctx, kv in plan["kv"].items():
        eprint(
            f"kv cache ({ctx}): {kv['bytes'] / 2**20:.2f} MiB, layers {kv['layers']}, "
            f"K {kv['type_k']}, V {kv['type_v']}, n_ctx {llm.cache.n_ctx}"
        )
        for name, g in kv["groups"].items():
            kind = "full attention" if g["window"] is None else f"sliding window {g['window']}"
            per = g.get("bytes_per_token_layer")
            per = f", K {per['k']} + V {per['v']} bytes per token per layer" if per else ""
            eprint(
                f"  {name:<12} {len(g['layers']):3d} layers x {g['cells']} cells ({kind}): "
                f"{g['bytes'] / 2**20:.2f} MiB{per}"
            )


def print_timings(llm) -> None:
    s = llm.stats
    pe_ms, ev_ms = s.prompt_seconds * 1e3, s.decode_seconds * 1e3
    eprint()
    eprint(f"llmkit: load time = {llm.lm.load_seconds * 1e3:10.2f} ms")
    eprint(
        f"llmkit: prompt eval time = {pe_ms:10.2f} ms / {s.prompt_tokens:5d} tokens "
        f"({pe_ms / max(1, s.prompt_tokens):8.2f} ms per token, {s.prompt_tok_per_s:8.2f} tokens per second)"
    )
    eprint(
        f"llmkit:        eval time = {ev_ms:10.2f} ms / {s.decode_steps:5d} runs   "
        f"({ev_ms / max(1, s.decode_tokens):8.2f} ms per token, {s.decode_tok_per_s:8.2f} tokens per second)"
    )
    if s.stop_reason:
        eprint(f"llmkit: stop: {s.stop_reason}")
    if llm.spec is not None:
        d = llm.spec.stats.to_dict(s.generated_tokens)
        per_pos = ", ".join(f"{a:.2f}" for a in d["acceptance_per_position"])
        eprint(
            f"llmkit: speculative ({d['type']}, draft {d['draft_max']}): {d['drafts']} drafts, "
            f"{d['accepted_tokens']}/{d['draft_tokens']} draft tokens accepted "
            f"({d['acceptance_rate']:.3f}), per position [{per_pos}], "
            f"mean accepted length {d['mean_accepted_length']:.2f}"
        )
        eprint(
            f"llmkit: speculative decode {d['decode_tok_per_s']:.2f} tok/s "
            f"({d['decode_tok_per_s_without_drafting']:.2f} tok/s without drafting time, "
            f"drafting {d['draft_seconds'] * 1e3:.1f} ms)"
        )


def reverse_hit(text: str, piece: str, prompts) -> bool:
    """-r/--reverse-prompt: does one of `prompts` end within the newest `piece` of `text`?"""
    return any(r and r in text[-(len(r) + len(piece) - 1) :] for r in prompts or ())


def chat_loop(llm, first: str | None, system: str | None, params, n_predict: int, ignore_eos: bool,
              verbose: bool, reverse_prompts=()) -> None:  # fmt: skip
    """Read user turns from stdin (`/exit` ends), stream each reply; the cache keeps the earlier
    turns, so each turn evaluates only its new tokens. A reverse prompt or Ctrl-C ends the reply
    and returns to the prompt; Ctrl-C at the prompt, or twice within a second, ends the chat."""
    if verbose:
        eprint(f"chat template: {llm.chat_format.source}")
    messages = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    pending, last_interrupt = first, -1.0
    while True:
        if pending is None:
            if interactive:
                sys.stdout.write("\n> ")
                sys.stdout.flush()
            try:
                line = sys.stdin.readline()
            except KeyboardInterrupt:
                sys.stdout.write("\n")
                break
            if not line:
                break
            pending = line.rstrip("\n")
            if pending.strip() in ("/exit", "/quit"):
                break
            if not pending.strip():
                pending = None
                continue
        messages.append({"role": "user", "content": pending})
        pending = None
        reply = []
        n_warn = len(llm.warnings)
        ids = llm.chat_prompt(messages)
        for w in llm.warnings[n_warn:]:  # the file's template failed: the built-in one is used
            eprint(f"warning: {w}")
        pieces = llm.stream(ids, params, n_predict, ignore_eos)
        try:
            for piece in pieces:
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
                if reverse_hit("".join(reply[-64:]), piece, reverse_prompts):
                    break
        except KeyboardInterrupt:
            now = time.monotonic()
            if now - last_interrupt < 1.0:
                raise
            last_interrupt = now
            eprint("\n[reply interrupted: Ctrl-C again to exit]")
        finally:
            pieces.close()
        messages.append({"role": "assistant", "content": "".join(reply)})
        sys.stdout.write("\n")
        sys.stdout.flush()
