"""`llm mtp-train`: train NextN (MTP) blocks on a frozen GGUF trunk by self-distillation.

Pipeline: (1) teacher data, cached next to the checkpoint: the trunk's hidden states and top-k
next-token distributions over the user's text and over text the model generates itself (batched);
(2) AdamW on fp32 blocks (the trunk, embedding and head stay frozen), every step running the D
draft-position streams of `streams.py` with the KL loss; checkpoints every `ckpt_every` steps
(blocks, optimizer, RNG, step), resumable; (3) the blocks written as an MTP sidecar GGUF and,
with `merge`, as the base model with the blocks appended. Seeded: the same seed and inputs give
the same head.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llmkit.core.model.sidecar import base_identity
from llmkit.core.models.loader import arch_module
from llmkit.core.mtp_train import data as D
from llmkit.core.mtp_train.export import OUT_TYPES, write_merged, write_sidecar
from llmkit.core.mtp_train.module import TrainBlock, init_from_head, init_from_trunk
from llmkit.core.mtp_train.streams import (
    distill_loss,
    hidden_loss,
    loss_rows,
    stream_forward,
    student_logits,
)
from llmkit.core.outputs import atomic_output, check_output
from llmkit.errors import LlmkitError


@dataclass
class TrainConfig:
    base: str
    out: str
    blocks: int = 1  # 1: one block reused autoregressively; K > 1: chained, one per draft step
    depth: int = 3  # draft positions trained with a reused block (chained: = blocks)
    text: list[str] = field(default_factory=list)
    generate: int = 20000  # tokens of self-generated text
    gen_len: int = 128  # new tokens per generated sequence
    gen_batch: int = 32  # sequences decoded together
    seq_len: int = 256  # tokens per text chunk
    max_text_tokens: int = 200_000
    steps: int = 300
    batch: int = 8  # sequences per step
    lr: float = 1e-3
    warmup: int = 20
    top_k: int = 16  # teacher tokens kept per position
    hidden_weight: float = 0.0  # weight of the hidden-state regression beside the KL loss
    eval_prompts: str | None = None  # file of evaluation prompts (blank-line separated)
    eval_len: int = 64  # greedy tokens continued per evaluation prompt
    draft_vocab: int = 16384  # draft-head shortlist size (0: the full vocabulary)
    seed: int = 0
    device: str = "cpu"
    resume: str | None = None
    init: str | None = None  # an MTP head (sidecar GGUF) whose blocks start the training
    outtype: str = "q8_0"
    merge: str | None = None  # path of the merged model (base + NextN blocks)
    merge_type: str | None = None  # None: like the trunk's last layer
    ckpt: str | None = None  # default: OUT.ckpt
    ckpt_every: int = 100
    eval_every: int = 100
    max_minutes: float | None = None  # stop the training loop (then export) after this long
    quiet: bool = False

    def validate(self) -> None:
        if self.blocks < 1 or self.depth < 1 or self.steps < 0 or self.batch < 1:
            raise LlmkitError("--blocks, --depth and --batch must be >= 1, --steps >= 0")
        if self.outtype not in OUT_TYPES:
            raise LlmkitError(f"--outtype must be one of {', '.join(OUT_TYPES)}")
        if self.merge_type is not None and self.merge_type not in OUT_TYPES:
            raise LlmkitError(f"--merge-type must be one of {', '.join(OUT_TYPES)}")
        if self.draft_vocab < 0:
            raise LlmkitError("--draft-vocab must be >= 0 (0: the full vocabulary)")
        if self.lr <= 0 or self.top_k < 2:
            raise LlmkitError("--lr must be > 0 and --top-k >= 2")
        if self.hidden_weight < 0 or self.eval_len < 2:
            raise LlmkitError("--hidden-weight must be >= 0 and --eval-len >= 2")
        if not self.text and self.generate <= 0:
            raise LlmkitError("no training text: give --text FILE or --generate N > 0")
        self.check_outputs()

    def sources(self) -> tuple:
        """The files training reads: no output (checkpoint, data cache, head) may replace them."""
        return (self.base, *self.text, self.eval_prompts, self.init)

    def check_outputs(self) -> None:
        """Fail before hours of training, not at the end: every output must be writable, none an
        input, no two the same file (the later write would replace the earlier)."""
        # the checkpoint may replace the one resumed from (that is how a run continues); the
        # head and the merged model never may
        outs = {"-o": self.out, "--merge": self.merge, "--ckpt": self.ckpt or self.out + ".ckpt"}
        seen: dict[str, str] = {}
        for flag, path in outs.items():
            if path is None:
                continue
            resume = () if flag == "--ckpt" else (self.resume,)
            real = str(check_output(path, (*self.sources(), *resume)))
            if real in seen:
                raise LlmkitError(f"{seen[real]} and {flag} are the same file {path}")
            seen[real] = flag


@dataclass
class TrainResult:
    out: Path
    merged: Path | None
    steps: int
    train_tokens: int
    first_loss: float
    last_loss: float
    val_agree: list[float]  # full-vocabulary top-1 agreement with the teacher, per draft position
    prompt_agree: list[float]  # the same on the greedy continuations of --eval-prompts
    seconds: dict


class _Log:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"mtp-train: {msg}", file=sys.stderr, flush=True)


def _lr(cfg: TrainConfig, step: int, time_frac: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 0.1 x lr over the budget: the steps, or the
    --max-minutes time budget when that runs out first (time_frac = share of it used)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = max((step - cfg.warmup) / max(1, cfg.steps - cfg.warmup), time_frac)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, t))))


def build_data(cfg: TrainConfig, lm, tok, log) -> list[D.Sequence]:
    texts = D.read_texts(cfg.text)
    seqs = []
    if texts:
        seqs += D.text_sequences(lm, tok, texts, cfg.seq_len, cfg.top_k, cfg.max_text_tokens, log)
    if cfg.generate > 0:
        paras = D.paragraphs(texts)
        seqs += D.generated_sequences(
            lm, tok, paras, cfg.generate, cfg.gen_len, cfg.gen_batch, cfg.top_k, cfg.seed, log
        )
    if not seqs:
        raise LlmkitError("no training sequences (the --text files are empty or too short)")
    return seqs


def head_matrix(lm) -> torch.Tensor:
    t = lm.tensors.get("output.weight") or lm.tensors["token_embd.weight"]
    return t.dequantize().to(lm.backend.device)


def evaluate(cfg, lm, blocks, head_w, val, depth: int) -> list[float]:
    """Full-vocabulary top-1 agreement of each draft position with the teacher's argmax."""
    c = lm.config
    agree, total = [0.0] * depth, [0] * depth
    with torch.no_grad():
        for i in range(0, len(val), cfg.batch):
            b = D.to_batch(val[i : i + cfg.batch]).to(cfg.device)
            emb = lm.model.embed(b.tokens.reshape(-1).cpu()).to(cfg.device)
            emb = emb.view(*b.tokens.shape, -1)
            outs = stream_forward(lm.model.block, c, blocks, emb, b, depth, c.n_layer)
            for d, h in enumerate(outs, 1):
                rows = loss_rows(b, d)
                j = 0 if len(blocks) == 1 else d - 1
                for s in range(0, int(rows.sum()), 1024):
                    hh = h[rows][s : s + 1024]
                    z = student_logits(c, blocks[j].shared_head_norm, head_w, hh)
                    agree[d - 1] += float((z.argmax(-1) == b.top_ids[rows][s : s + 1024, 0]).sum())
                total_d = int(rows.sum())
                total[d - 1] += total_d
    return [a / t if t else 0.0 for a, t in zip(agree, total, strict=True)]


def _save_ckpt(path: Path, state: dict, inputs) -> None:
    with atomic_output(path, inputs) as tmp:
        torch.save(state, tmp)


def train(cfg: TrainConfig) -> TrainResult:
    from llmkit.core.models.loader import load_model
    from llmkit.core.tokenizer import load_tokenizer

    cfg.validate()
    log = _Log(cfg.quiet)
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    lm = load_model(cfg.base, device=cfg.device, weight_dtype=torch.float32)
    if lm.arch not in ("llama", "gemma3"):
        raise LlmkitError(f"mtp-train supports llama and gemma3 models, not {lm.arch}")
    if lm.config.n_nextn:
        raise LlmkitError(f"{cfg.base} already has NextN blocks: train on a trunk-only model")
    tok = load_tokenizer(lm.metadata)
    c, arch = lm.config, arch_module(lm.arch)
    ckpt_path = Path(cfg.ckpt or cfg.out + ".ckpt")
    data_path = ckpt_path.with_name(ckpt_path.name + ".data.pt")
    base_id = base_identity(lm.gguf)
    state = None
    if cfg.resume:
        try:
            state = torch.load(cfg.resume, weights_only=False)
        except (OSError, RuntimeError) as e:
            raise LlmkitError(f"cannot read checkpoint {cfg.resume}: {e}") from None
        if state.get("base_id") != base_id:
            raise LlmkitError(f"checkpoint {cfg.resume} was trained on another base model")
        data_path = Path(state["data_path"])
    t0 = time.perf_counter()
    if data_path.exists() and (cfg.resume or state is None):
        seqs, meta = D.load_sequences(data_path)
        if meta.get("base_id") != base_id or meta.get("top_k") != cfg.top_k:
            if cfg.resume:
                raise LlmkitError(f"training data {data_path} does not match the checkpoint")
            seqs = None
        else:
            log(f"reusing the cached training data {data_path} ({len(seqs)} sequences)")
    else:
        seqs = None
    if seqs is None:
        seqs = build_data(cfg, lm, tok, log)
        meta = {"base_id": base_id, "top_k": cfg.top_k}
        D.save_sequences(data_path, seqs, meta, inputs=cfg.sources())
    t_data = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(seqs), generator=gen).tolist()
    n_val = max(1, len(seqs) // 20) if len(seqs) > 1 else 0
    val = [seqs[i] for i in order[:n_val]]
    train_set = [seqs[i] for i in order[n_val:]] or seqs
    n_tok = sum(s.tokens.numel() for s in train_set)
    log(f"{len(train_set)} training sequences ({n_tok} tokens), {len(val)} held out")
    vocab, coverage = D.draft_vocab(seqs, cfg.draft_vocab, c.n_vocab)
    if vocab is not None:
        log(
            f"draft vocabulary: {vocab.numel()} tokens cover {coverage:.4f} of the teacher argmaxes"
        )

    depth = cfg.blocks if cfg.blocks > 1 else cfg.depth
    h_rms = float(torch.cat([s.hidden for s in train_set[:64]]).pow(2).mean().sqrt())
    if cfg.init:  # train on from a head's blocks
        src = load_model(cfg.base, mtp=True, draft_path=cfg.init)
        if src.config.n_nextn < cfg.blocks:
            raise LlmkitError(f"{cfg.init} has {src.config.n_nextn} NextN blocks, not {cfg.blocks}")
        inits = [init_from_head(arch, c, src.tensors, j) for j in range(cfg.blocks)]
        log(f"blocks initialised from {cfg.init}")
    else:
        inits = [init_from_trunk(arch, c, lm.tensors, h_rms, gen) for _ in range(cfg.blocks)]
    blocks = torch.nn.ModuleList(TrainBlock(arch, init) for init in inits).to(cfg.device)
    opt = torch.optim.AdamW(blocks.parameters(), lr=cfg.lr, weight_decay=0.0)
    step, losses = 0, []
    if state is not None:
        blocks.load_state_dict(state["blocks"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["rng"])
        step, losses = state["step"], state["losses"]
        log(f"resumed from {cfg.resume} at step {step}")
    head_w = head_matrix(lm)  # frozen: a plain tensor, never a parameter
    out_norm = lm.model.output_norm.to(cfg.device)
    dev = []
    if cfg.eval_prompts:
        prompts = [p.strip() for p in D.read_texts([cfg.eval_prompts])[0].split("\n\n")]
        dev = D.prompt_sequences(lm, tok, [p for p in prompts if p], cfg.eval_len, cfg.top_k)
        n_dev = sum(s.tokens.numel() - s.start for s in dev)
        log(f"{len(dev)} evaluation prompts, {n_dev} greedy tokens scored")

    def check(step):
        va = evaluate(cfg, lm, blocks, head_w, val, depth) if val else []
        pa = evaluate(cfg, lm, blocks, head_w, dev, depth) if dev else []
        log(
            f"step {step}: top-1 agreement per draft position, held-out {_fmt(va)}"
            + (f", evaluation prompts {_fmt(pa)}" if dev else "")
        )
        return va, pa

    def checkpoint():
        _save_ckpt(
            ckpt_path,
            {
                "blocks": blocks.state_dict(),
                "opt": opt.state_dict(),
                "rng": gen.get_state(),
                "step": step,
                "losses": losses,
                "base_id": base_id,
                "data_path": str(data_path),
                "config": asdict(cfg),
            },
            cfg.sources(),
        )

    t0 = time.perf_counter()
    deadline = t0 + 60 * cfg.max_minutes if cfg.max_minutes else None  # training time only
    bar = _progress(cfg, step)
    while step < cfg.steps:
        if deadline is not None and time.perf_counter() > deadline:
            log(f"--max-minutes reached at step {step}: stopping")
            break
        idx = torch.randint(len(train_set), (cfg.batch,), generator=gen).tolist()
        b = D.to_batch([train_set[i] for i in idx]).to(cfg.device)
        time_frac = (time.perf_counter() - t0) / (deadline - t0) if deadline else 0.0
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step, time_frac)
        with torch.no_grad():
            emb = lm.model.embed(b.tokens.reshape(-1).cpu()).to(cfg.device)
            emb = emb.view(*b.tokens.shape, -1)
        outs = stream_forward(lm.model.block, c, blocks, emb, b, depth, c.n_layer)
        loss, agree = 0.0, []
        for d, h in enumerate(outs, 1):
            j = 0 if len(blocks) == 1 else d - 1
            rows = loss_rows(b, d)
            if rows.any():
                ld, ad = distill_loss(c, blocks[j].shared_head_norm, head_w, h, b, rows)
                if cfg.hidden_weight:
                    ld = ld + cfg.hidden_weight * hidden_loss(out_norm, c.eps, h, b, rows)
                loss = loss + ld / len(outs)
                agree.append(float(ad))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(blocks.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(float(loss.detach()))
        bar(step, losses[-1], agree)
        if cfg.ckpt_every and step % cfg.ckpt_every == 0:
            checkpoint()
        if cfg.eval_every and step % cfg.eval_every == 0 and (val or dev):
            check(step)
    checkpoint()
    t_train = time.perf_counter() - t0
    val_agree, prompt_agree = check(f"{step} (final)")
    tensors = {}
    for j, blk in enumerate(blocks):
        tensors |= blk.cpu().gguf_tensors(c.n_layer + j)
    info = {
        "steps": step,
        "seed": cfg.seed,
        "train_tokens": n_tok,
        "depth": depth,
        "final_loss": losses[-1] if losses else 0.0,
        "val_top1_agreement": [float(a) for a in val_agree],
        "draft_vocab_coverage": coverage,
    }
    if prompt_agree:
        info["eval_prompts_top1_agreement"] = [float(a) for a in prompt_agree]
    inputs = (*cfg.sources(), cfg.resume)
    qt = OUT_TYPES[cfg.outtype]
    out = write_sidecar(cfg.out, lm.gguf, tensors, cfg.blocks, qt, info, vocab, inputs=inputs)
    merged = None
    if cfg.merge:
        mt = OUT_TYPES[cfg.merge_type] if cfg.merge_type else None
        merged = write_merged(
            cfg.merge, lm.gguf, tensors, cfg.blocks, mt, info, vocab, inputs=(*inputs, cfg.out)
        )
    log(f"wrote {out}" + (f" and {merged}" if merged else ""))
    return TrainResult(
        out,
        merged,
        step,
        n_tok,
        losses[0] if losses else 0.0,
        losses[-1] if losses else 0.0,
        val_agree,
        prompt_agree,
        {"data": t_data, "train": t_train, "total": time.perf_counter() - t_start},
    )


def _fmt(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"


def _progress(cfg: TrainConfig, start: int):
    """Progress on stderr: one refreshed line on a terminal, a line every 15 s in a log file."""
    if cfg.quiet:
        return lambda step, loss, agree: None
    tty = sys.stderr.isatty()
    t0, first, last = time.perf_counter(), start, [0.0]

    def update(step: int, loss: float, agree: list[float]) -> None:
        now = time.perf_counter()
        if step < cfg.steps and now - last[0] < (0.5 if tty else 15.0):
            return
        last[0] = now
        rate = (step - first) / max(now - t0, 1e-9)
        eta = (cfg.steps - step) / rate if rate > 0 else 0.0
        line = (
            f"mtp-train: step {step}/{cfg.steps} loss {loss:.4f} top-1 {_fmt(agree)} "
            f"{rate:.2f} steps/s eta {eta:.0f} s"
        )
        end = "\n" if not tty or step >= cfg.steps else ""
        print(("\r" if tty else "") + line, end=end, file=sys.stderr, flush=True)

    return update
