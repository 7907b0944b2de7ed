"""llama.cpp-style flag parsing for every `llm` subcommand.

click would read an unknown multi-letter short flag such as `-ngl` as `-n` with the value `gl`;
llama.cpp has many such flags (`-ngl`, `-fa`, `-sys`, `-cnv`, `-ctk`, ...). `LlamaCommand` walks
the arguments first, as click will (an option's value is skipped, never read as a flag): a
multi-letter short flag is only ever the option of that name, and a llama.cpp flag that llmkit
does not implement is refused by name.
"""

from __future__ import annotations

import re

import typer
from typer.core import TyperCommand

# Typer ships its own copy of click: take its UsageError from a public class's MRO.
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

# llama.cpp's common flags (common/arg.cpp, llama-cli / llama-server / llama-bench /
# llama-perplexity): what a llama.cpp user may type.
LLAMA_CPP_FLAGS = frozenset(
    """
    -h --help --usage --version --completion-bash --verbose-prompt -t --threads -tb
    --threads-batch -C --cpu-mask -Cr --cpu-range --cpu-strict --prio --poll -Cb --cpu-mask-batch
    -Crb --cpu-range-batch --cpu-strict-batch --prio-batch --poll-batch -lcs --lookup-cache-static
    -lcd --lookup-cache-dynamic -c --ctx-size -n --predict --n-predict -b --batch-size -ub
    --ubatch-size --keep --swa-full --no-context-shift --context-shift --chunks -fa --flash-attn
    -p --prompt --no-perf --perf -f --file -bf --binary-file -e --escape --no-escape -ptc
    --print-token-count --prompt-cache --prompt-cache-all --prompt-cache-ro -r --reverse-prompt
    -sp --special -cnv --conversation -no-cnv --no-conversation -st --single-turn -i
    --interactive -if --interactive-first -mli --multiline-input --in-prefix-bos --in-prefix
    --in-suffix --no-warmup --spm-infill --samplers -s --seed --sampling-seq --sampler-seq
    --ignore-eos --temp --top-k --top-p --min-p --top-nsigma --xtc-probability --xtc-threshold
    --typical --repeat-last-n --repeat-penalty --presence-penalty --frequency-penalty
    --dry-multiplier --dry-base --dry-allowed-length --dry-penalty-last-n --dry-sequence-breaker
    --dynatemp-range --dynatemp-exp --mirostat --mirostat-lr --mirostat-ent -l --logit-bias
    --grammar --grammar-file -j --json-schema -jf --json-schema-file --pooling --attention
    --rope-scaling --rope-scale --rope-freq-base --rope-freq-scale --yarn-orig-ctx
    --yarn-ext-factor --yarn-attn-factor --yarn-beta-slow --yarn-beta-fast -nkvo --no-kv-offload
    -nr --no-repack -ctk --cache-type-k -ctv --cache-type-v -dt --defrag-thold -np --parallel
    --mlock --no-mmap --numa -dev --device --list-devices -ot --override-tensor -cmoe --cpu-moe
    -ncmoe --n-cpu-moe -ngl --gpu-layers --n-gpu-layers -sm --split-mode -ts --tensor-split -mg
    --main-gpu --check-tensors --override-kv --no-op-offload --lora --lora-scaled
    --control-vector --control-vector-scaled --control-vector-layer-range -a --alias -m --model
    -mu --model-url -hf -hfr --hf-repo -hfd -hfrd --hf-repo-draft -hff --hf-file -hfv -hfrv
    --hf-repo-v -hffv --hf-file-v -hft --hf-token --log-disable --log-file --log-colors -v
    --verbose --log-verbose -lv --verbosity --log-verbosity --log-prefix --log-timestamps -ctkd
    --cache-type-k-draft -ctvd --cache-type-v-draft --draft --draft-max --draft-n -md
    --model-draft --draft-min --draft-p-min -cd --ctx-size-draft -devd --device-draft -ngld
    --gpu-layers-draft --n-gpu-layers-draft --chat-template --chat-template-file --jinja
    --no-jinja --reasoning-format --reasoning-budget -sys --system-prompt -sysf
    --system-prompt-file --no-display-prompt --color -co --embd-normalize --host --port --path
    --api-prefix --no-webui --embedding --embeddings --reranking --rerank --api-key
    --api-key-file --ssl-key-file --ssl-cert-file -to --timeout --threads-http --cache-reuse
    --metrics --slots --no-slots --slot-save-path --props --n-probs --image --mmproj
    --mmproj-url --no-mmproj --no-mmproj-offload -kvu --kv-unified -dio --direct-io -o --output
    -pps -npp -ntg -npl -pg -nopo --no-op-offload -r --repetitions -embd --embd-separator
    --kl-divergence --kl-divergence-base --hellaswag --winogrande --multiple-choice -ps
    """.split()
)

FLASH_ATTN_VALUES = ("on", "off", "auto", "1", "0", "true", "false", "enabled", "disabled")
_MULTI_SHORT = re.compile(r"-[A-Za-z][A-Za-z-]+")


def _option_names(cmd, ctx) -> dict[str, bool]:
    """Each option name of `cmd` -> whether it takes a value."""
    names = {}
    for p in cmd.get_params(ctx):
        if getattr(p, "param_type_name", "") != "option":
            continue
        takes = not (getattr(p, "is_flag", False) or getattr(p, "count", False))
        for n in [*p.opts, *p.secondary_opts]:
            names[n] = takes
    return names


def _elsewhere(ctx) -> set[str]:
    """The option names of every `llm` subcommand."""
    group = ctx.parent.command if ctx.parent is not None else None
    out = set()
    for cmd in getattr(group, "commands", {}).values():
        out.update(_option_names(cmd, ctx))
    return out


def normalize_args(cmd, ctx, args: list[str]) -> list[str]:
    """The arguments with a bare `-fa` given the value `on`; a UsageError for a multi-letter
    short flag the command lacks, and for any llama.cpp flag llmkit does not implement."""
    names, out, i = _option_names(cmd, ctx), [], 0
    while i < len(args):
        a = args[i]
        if a == "--":
            out += args[i:]
            break
        name = a.split("=", 1)[0] if a.startswith("-") else a
        if name in ("-fa", "--flash-attn") and name in names and "=" not in a:
            bare = i + 1 == len(args) or args[i + 1].startswith("-")  # old llama.cpp: a switch
            out += [a, "on"] if bare else [a]
            i += 1
            continue
        if name in names:
            takes = names[name] and "=" not in a
            out += args[i : i + 1 + takes]
            i += 1 + takes
            continue
        if a.startswith("--") or _MULTI_SHORT.fullmatch(name):
            if name in _elsewhere(ctx):
                raise UsageError(f"{name} is not an option of `llm {ctx.info_name}`", ctx)
            if name in LLAMA_CPP_FLAGS:
                raise UsageError(f"llama.cpp flag {name} is not supported by llmkit", ctx)
            if not a.startswith("--"):
                raise UsageError(f"No such option: {name}", ctx)
        out.append(a)
        i += 1
    return out


class LlamaCommand(TyperCommand):
    """A Typer command whose arguments go through `normalize_args` first."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, normalize_args(self, ctx, list(args)))
