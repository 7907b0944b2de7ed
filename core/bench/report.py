"""`llm bench` records and their formats: a llama-bench markdown table, JSON, JSONL and CSV.

One record per (model, settings, test) carries every figure, the raw samples and the environment
(device, torch/triton versions, git commit), so runs can be diffed. Field names follow llama-bench's
JSON where it has one (`model_type`, `avg_ts`, `samples_ns`, ...).
"""

from __future__ import annotations

import csv
import io
import json
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from llmkit.core.bench.params import (
    BANDWIDTH_BASIS,
    BUILTIN_PROMPTS,
    BenchParams,
    Instance,
    mean_std,
)

FORMATS = ("md", "json", "jsonl", "csv")


def _git_state() -> tuple[str, bool | None]:
    """(short commit, dirty) of the llmkit checkout; ("unknown", None) outside a git tree."""
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
        )

    try:
        head = git("rev-parse", "--short=7", "HEAD")
        if head.returncode != 0:
            return "unknown", None
        status = git("status", "--porcelain", "--untracked-files=no")
        return head.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    """What every record repeats about the build and the machine."""
    commit, dirty = _git_state()
    gpu = None
    if device == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.cuda.current_device())
    return {
        "build_commit": commit,
        "build_dirty": dirty,
        "llmkit_version": _version("llmkit"),
        "torch_version": torch.__version__,
        "triton_version": _version("triton"),
        "cpu_info": cpu_name(),
        "gpu_info": gpu,
    }


def make_record(
    p: BenchParams,
    inst: Instance,
    lm,
    path,
    samples_ns: list[int],
    spec,
    env: dict,
    exit_layer: int | None = None,
    paired_ns: list[int] | None = None,
) -> dict:
    """The record of one instance (every key present in every record, None where it does not
    apply, so CSV columns line up); `exit_layer`: an early-exit row's L as resolved;
    `paired_ns`: a drafted row's plain runs, each timed right before one of its repetitions."""

    ts = [inst.n * 1e9 / ns for ns in samples_ns]
    avg_ns, std_ns = mean_std(samples_ns)
    avg_ts, std_ts = mean_std(ts)
    tg = inst.kind == "tg"
    wbytes = lm.backend.linear_bytes
    acc = spec.to_dict(0) if spec is not None else {}
    return {
        **env,
        "device": p.device,
        "backends": "CUDA" if p.device == "cuda" else "CPU",
        "model_filename": str(path),
        "model_type": lm.describe(),
        "model_size": lm.weights_bytes(),
        "model_n_params": lm.n_params(),
        "weight_bytes_read": wbytes,
        "n_threads": inst.threads,
        "n_ubatch": inst.n_ubatch,
        "type_k": inst.type_k,
        "type_v": inst.type_v,
        "n_prompt": 0 if tg else inst.n,
        "n_gen": inst.n if tg else 0,
        "n_depth": inst.depth,
        "test": inst.test,
        "mtp": inst.mtp,
        "spec": inst.spec,
        "n_layer_exit": exit_layer,
        "n_draft": inst.draft,
        "draft_p_min": inst.p_min if inst.spec else None,
        "draft_branches": inst.branches if inst.spec else None,
        "gen_input": p.gen_input if tg else "random",
        "prompt_file": p.prompt_file if tg and p.text_gen else None,
        "warmup": p.warmup,
        "repetitions": p.reps,
        "test_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "avg_ns": avg_ns,
        "stddev_ns": std_ns,
        "avg_ts": avg_ts,
        "stddev_ts": std_ts,
        "samples_ns": list(samples_ns),
        "samples_ts": ts,
        "bandwidth_gbs": wbytes * avg_ts / 1e9 if tg else None,
        "bandwidth_basis": BANDWIDTH_BASIS if tg else None,
        "drafts": acc.get("drafts"),
        "draft_tokens": acc.get("draft_tokens"),
        "accepted_tokens": acc.get("accepted_tokens"),
        "acceptance_rate": acc.get("acceptance_rate"),
        "accepted_per_position": acc.get("accepted_per_position"),
        "acceptance_per_position": acc.get("acceptance_per_position"),
        "mean_accepted_length": acc.get("mean_accepted_length"),
        "speedup": None,
        "paired_plain_ns": list(paired_ns) if paired_ns else None,
        "speedup_paired": sum(paired_ns) / sum(samples_ns) if paired_ns else None,
        "lossless": None,
    }


def set_speedups(instances: list[Instance], records: list[dict]) -> None:
    """Drafted (MTP, early-exit) rows: t/s over the plain row with the same model, settings and
    test (if measured)."""
    base = {i.baseline_key(): r for i, r in zip(instances, records) if not i.spec}
    for inst, rec in zip(instances, records):
        ref = base.get(inst.baseline_key()) if inst.spec else None
        if ref is not None and ref["avg_ts"] > 0:
            rec["speedup"] = rec["avg_ts"] / ref["avg_ts"]


def set_lossless(instances: list[Instance], records: list[dict], outputs: list[list]) -> None:
    """Drafted rows: `lossless` is whether every repetition generated the plain row's tokens
    (greedy drafting must not change the output); None without a plain row to compare with."""
    base = {i.baseline_key(): o for i, o in zip(instances, outputs) if not i.spec}
    for inst, rec, out in zip(instances, records, outputs):
        ref = base.get(inst.baseline_key()) if inst.spec else None
        if ref is not None and None not in ref and None not in out:
            rec["lossless"] = out == ref


# -- markdown ----------------------------------------------------------------------------------
# llama-bench's field widths: negative = left-aligned (text), positive = right-aligned
_WIDTHS = {"model": -30, "size": 10, "params": 10, "backend": -10, "threads": 7, "type_k": 6,
           "type_v": 6, "test": 15, "t/s": 20, "accept/pos": -10}  # fmt: skip


def _size(b: int) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.2f} MiB"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _opt(fmt: str, v) -> str:
    return "-" if v is None else fmt.format(v)


def _columns(records: list[dict], p: BenchParams, default_threads: int) -> list[tuple]:
    """(header, cell function) per column: llama-bench's fixed ones, then each parameter swept or
    set away from its default, then the test and its figures."""
    cols = [
        ("model", lambda r: r["model_type"]),
        ("size", lambda r: _size(r["model_size"])),
        ("params", lambda r: _params(r["model_n_params"])),
        ("backend", lambda r: r["backends"]),
    ]
    if p.device == "cpu" or p.threads != [default_threads]:
        cols.append(("threads", lambda r: str(r["n_threads"])))
    for key, default in (("n_ubatch", 512), ("type_k", "f16"), ("type_v", "f16")):
        if getattr(p, key) != [default]:
            cols.append((key, lambda r, k=key: str(r[k])))
    if 1 in p.mtp:
        cols.append(("mtp", lambda r: str(r["mtp"])))
    if p.n_layer_exit:
        cols.append(("exit", lambda r: _opt("{}", r["n_layer_exit"])))
    if p.speculative:
        cols.append(("draft", lambda r: _opt("{}", r["n_draft"])))
        if p.p_min != [0.0]:
            cols.append(("p_min", lambda r: _opt("{:g}", r["draft_p_min"])))
        if p.branches != [1]:
            cols.append(("branches", lambda r: _opt("{}", r["draft_branches"])))
    cols.append(("test", lambda r: r["test"]))
    cols.append(("t/s", lambda r: f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}"))
    if any(r["n_gen"] for r in records):
        cols.append(("GB/s", lambda r: _opt("{:.2f}", r["bandwidth_gbs"])))
    if p.speculative:
        cols += [
            ("accept", lambda r: _opt("{:.3f}", r["acceptance_rate"])),
            ("accept/pos", lambda r: _opt("{}", _per_pos(r["acceptance_per_position"]))),
            ("acc len", lambda r: _opt("{:.2f}", r["mean_accepted_length"])),
            ("speedup", lambda r: _opt("{:.2f}x", r["speedup"])),
            ("paired", lambda r: _opt("{:.2f}x", r["speedup_paired"])),
        ]
    return cols


def _per_pos(v: list[float] | None) -> str | None:
    return None if v is None else "/".join(f"{a:.2f}" for a in v)


def _notes(records: list[dict], p: BenchParams) -> list[str]:
    notes = []
    if any(r["n_gen"] for r in records):
        effective = "; for drafted rows an effective figure (one pass's bytes per token)"
        notes.append(
            "GB/s: weights read per decoded token x t/s, as gpt-fast prints it; bytes = the "
            "weight bytes the matmuls read per token (backend.linear_bytes)"
            + (effective if p.speculative else "")
        )
    if p.text_gen:
        src = f"--prompt-file {p.prompt_file}" if p.prompt_file else "the built-in prompt set"
        n = len(p.prompts or BUILTIN_PROMPTS)
        notes.append(
            f"tg input: real text, {src} ({n} prompts; repetition r continues prompt r mod {n}, "
            "greedy); pp input: random tokens"
        )
    else:
        notes.append("pp/tg input: random tokens")
    if p.speculative:
        notes.append(
            "drafted rows: accept = accepted / drafted tokens; accept/pos = share of verify rounds whose "
            "draft position i was accepted; acc len = mean tokens per round; speedup = t/s over "
            "the matching plain row; paired = plain time / drafted time, the plain run of each "
            "repetition's prompt timed right before it on the same load; pp rows never draft"
            + ("; size/params of MTP rows include the NextN blocks" if 1 in p.mtp else "")
        )
    if p.n_layer_exit:
        notes.append(
            "early exit (--spec early-exit): exit = the layers L that draft, over the target's "
            "own KV (no extra weights)"
        )
    differ = [r["test"] for r in records if r["lossless"] is False]
    if differ:
        notes.append(f"WARNING: drafted output differs from the plain output in {differ}")
    return notes


def markdown(records: list[dict], p: BenchParams, default_threads: int) -> str:
    cols = _columns(records, p, default_threads)
    cells = [[fn(r) for _, fn in cols] for r in records]
    widths = []
    for j, (name, _) in enumerate(cols):
        w = _WIDTHS.get(name, max(len(name), 6))
        size = max([abs(w), len(name)] + [len(row[j]) for row in cells])
        widths.append(-size if w < 0 else size)

    def line(values):
        return (
            "| "
            + " | ".join(v.ljust(-w) if w < 0 else v.rjust(w) for v, w in zip(values, widths))
            + " |"
        )

    rule = "| " + " | ".join("-" * (-w) if w < 0 else "-" * (w - 1) + ":" for w in widths) + " |"
    out = [line([name for name, _ in cols]), rule, *map(line, cells), ""]
    out += _notes(records, p)
    r0 = records[0] if records else {}
    commit = r0.get("build_commit", "unknown") + ("-dirty" if r0.get("build_dirty") else "")
    out.append(f"build: {commit} (llmkit {r0.get('llmkit_version')})")
    return "\n".join(out) + "\n"


# -- machine-readable --------------------------------------------------------------------------
def _csv_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return ";".join(map(str, v))
    return str(v)


def csv_text(records: list[dict]) -> str:
    buf = io.StringIO()
    if records:
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(records[0].keys())
        for r in records:
            w.writerow([_csv_cell(v) for v in r.values()])
    return buf.getvalue()


def render(records: list[dict], fmt: str, p: BenchParams, default_threads: int) -> str:
    if fmt == "md":
        return markdown(records, p, default_threads)
    if fmt == "json":
        return json.dumps(records, indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in records)
    return csv_text(records)
