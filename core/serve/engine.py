"""The continuous-batching engine: slots, an admission queue and a step loop on one thread.

Each step:
 1. cancelled requests leave their slot (their KV blocks go back at once);
 2. queued requests are admitted, first come first served, into free slots while the KV pool can
    reserve their worst case; the others wait ("deferred"), the server never runs out mid-request;
 3. one decode step for every decoding slot: MTP slots draft first, each in its own MTP context;
    then the rows of all slots ([last] or [last, drafts...]) go through batched target forwards;
    each slot samples or verifies its own rows, rolls back its own sequence and keeps its
    accepted rows, with their own hidden states, for its own MTP context;
 4. one prompt chunk (n_ubatch tokens) of one prefilling slot, round-robin, so long prompts do not
    stall the slots that are generating.
Decode forwards carry at most `max_rows` (16) rows: the kernel table's CPU matmuls are batch-
invariant in that regime (kernels/ops.py), and BatchCache attends per sequence, so a row's logits
do not depend on its neighbours and greedy output is the same alone or beside 7 other requests. A
step with more rows runs several forwards. MTP slots draft through one batched drafter reserved
at start-up for every slot (core/serve/drafting.py): NextN heads over paged pools of their own, or
a Gemma 4 assistant reading the target's pool.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from llmkit.core.cache.batch import BatchCache
from llmkit.core.cache.paged import PagedKV
from llmkit.core.decode.drafter import DraftJob
from llmkit.core.decode.sampling import Sampler
from llmkit.core.decode.speculative import accept
from llmkit.core.embed import embed
from llmkit.core.serve.drafting import reserve_drafter
from llmkit.core.serve.metrics import Metrics
from llmkit.core.serve.policy import DraftPolicy
from llmkit.core.serve.request import Event, Request
from llmkit.core.serve.slot import Slot
from llmkit.core.serve.text import TextOut
from llmkit.errors import LlmkitError
from llmkit.kernels.backend import GEMV_MAX_ROWS


@dataclass
class ServeOptions:
    n_slots: int = 1
    n_ctx: int = 4096  # per sequence: prompt + generated tokens
    n_ubatch: int = 512
    kv_tokens: int | None = None  # pool size in tokens (default n_ctx * n_slots)
    kv_block_size: int = 16
    type_k: str = "f16"
    type_v: str = "f16"
    type_k_draft: str = "f16"
    type_v_draft: str = "f16"
    mtp: bool = False
    assistant: str | None = None  # a gemma4-assistant GGUF drafting instead of NextN heads
    draft: int = 3
    draft_p_min: float = 0.0
    draft_policy: str = "adaptive"  # adaptive | fixed
    prefix_sharing: bool = True
    max_rows: int = GEMV_MAX_ROWS
    max_queue: int = 64  # requests waiting for a slot; one more is refused (HTTP 503)


class QueueFull(LlmkitError):
    """The admission queue holds max_queue requests: the client should retry later."""


@dataclass
class _Plan:
    slot: Slot
    rows: list[int]
    drafts: list[int]
    qs: list
    p0: int


class Engine:
    def __init__(self, lm, tokenizer, opts: ServeOptions, metrics: Metrics | None = None):
        if opts.n_slots < 1:
            raise LlmkitError(f"-np must be >= 1, got {opts.n_slots}")
        if opts.max_queue < 1:
            raise LlmkitError(f"--max-queue must be >= 1, got {opts.max_queue}")
        if opts.draft_policy not in ("adaptive", "fixed"):
            raise LlmkitError(f"--draft-policy must be adaptive or fixed, not {opts.draft_policy}")
        self.lm, self.model, self.tok, self.opts = lm, lm.model, tokenizer, opts
        self.metrics = metrics or Metrics()
        kv_tokens = opts.kv_tokens or opts.n_ctx * opts.n_slots
        self.pool = PagedKV(
            self.model.kv_layout(),
            kv_tokens,
            opts.kv_block_size,
            opts.n_slots,
            max(opts.n_ubatch, opts.draft + 1),
            opts.type_k,
            opts.type_v,
            lm.backend.device,
        )
        self.drafter = reserve_drafter(lm, opts, self.pool) if opts.mtp else None
        self.mtp_plan = self.drafter.plan() if self.drafter else None
        self.slots = [Slot(i, opts.mtp) for i in range(opts.n_slots)]
        self.policy = (
            DraftPolicy(opts.draft, opts.draft_policy == "adaptive", opts.max_rows)
            if opts.mtp
            else None
        )
        self.queue: deque[Request] = deque()
        self.calls: deque[tuple] = deque()  # (fn, Future): run on the engine thread between steps
        self.cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._rr = 0  # round-robin pointer over prefilling slots
        self.snapshot: dict = {}
        self._publish_snapshot()

    # -- public (any thread) ----------------------------------------------------------------------
    def n_tokens(self, req: Request) -> int:
        """Positions the request's sequence may reach: its KV reservation."""
        extra = self.opts.draft if self._uses_mtp(req) else 0
        return min(self.opts.n_ctx, len(req.prompt) + req.params.max_tokens + extra)

    def submit(self, req: Request) -> None:
        """Queue a request; LlmkitError (a 400 for the client) if it can never be served."""
        n, ctx = len(req.prompt), self.opts.n_ctx
        if n == 0:
            raise LlmkitError("the prompt is empty")
        if n >= ctx:
            raise LlmkitError(
                f"the prompt is {n} tokens; this server's context is {ctx} tokens per request"
            )
        slot = req.params.id_slot
        if slot is not None and not 0 <= slot < len(self.slots):
            raise LlmkitError(f"id_slot must be between 0 and {len(self.slots) - 1}")
        if not self.pool.fits_ever(self.n_tokens(req)):
            raise LlmkitError(
                f"the request needs {self.n_tokens(req)} KV tokens, more than the pool holds"
            )
        with self.cv:
            waiting = sum(not r.cancelled for r in self.queue)
            if waiting >= self.opts.max_queue:
                self.metrics.requests_rejected.inc()
                raise QueueFull(f"server busy: {waiting} requests already waiting, retry later")
            self.queue.append(req)
            self.cv.notify()

    def embed(self, ids: list[list[int]], pooling: str) -> list[list[float]]:
        """/v1/embeddings' forwards, on the engine thread (under --tp: core/serve/tp.py)."""
        return embed(self.lm, ids, pooling)

    def call(self, fn) -> Future:
        """Run fn() on the engine thread between two steps (model work outside the slots, e.g.
        embeddings); the Future gets its result or exception."""
        fut: Future = Future()
        with self.cv:
            self.calls.append((fn, fut))
            self.cv.notify()
        return fut

    def cancel(self, req: Request) -> None:
        with self.cv:
            req.cancelled = True
            self.cv.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self.cv:
            self._stop = True
            self.cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- the loop ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cv:
                while not (self._stop or self.queue or self.calls) and all(
                    s.req is None for s in self.slots
                ):
                    self.cv.wait()
                if self._stop:
                    break
                calls, self.calls = self.calls, deque()
            for fn, fut in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        with torch.inference_mode():
                            fut.set_result(fn())
                    except Exception as e:
                        fut.set_exception(e)
            try:
                with torch.inference_mode():
                    self.step()
            except Exception as e:  # a bug outside any one slot: fail those in flight, keep serving
                for s in self.slots:
                    if s.req is not None:
                        self._fail(s, e)
            self._publish_snapshot()

    def _fail(self, s: Slot, e: Exception) -> None:
        """End this slot's request with an error event (HTTP 500 / an SSE error) and free the
        slot; its neighbours carry on."""
        print(f"llm serve: request failed in slot {s.id}:", file=sys.stderr)
        traceback.print_exception(e, file=sys.stderr)
        if s.req is not None:
            s.req.emit(
                Event(
                    "error", text="internal error in this request (the server log has the details)"
                )
            )
            self.metrics.requests_failed.inc()
        try:
            self._free(s)
        except Exception as e2:  # never leave the slot taken
            traceback.print_exception(e2, file=sys.stderr)
            s.req, s.seq, s.draft, s.state, s.sampler, s.text = None, None, None, "idle", None, None

    def step(self) -> None:
        self._reap()
        self._admit()
        decoding = [s for s in self.slots if s.state == "decode"]
        if decoding:
            self._decode(decoding)
        prefilling = [s for s in self.slots if s.state == "prefill"]
        if prefilling:
            s = min(prefilling, key=lambda s: (s.id - self._rr) % len(self.slots))
            self._rr = s.id + 1
            try:  # one slot's forward: a failure is this request's alone
                self._prefill(s)
            except Exception as e:
                self._fail(s, e)

    def _reap(self) -> None:
        for s in self.slots:
            if s.req is not None and s.req.cancelled:
                self.metrics.requests_cancelled.inc()
                self._free(s)

    def _uses_mtp(self, req: Request) -> bool:
        return self.opts.mtp and req.params.speculative and req.params.grammar is None

    def _admit(self) -> None:
        with self.cv:
            while self.queue:
                req = self.queue[0]
                if req.cancelled:
                    self.queue.popleft()
                    self.metrics.requests_cancelled.inc()
                    continue
                want = req.params.id_slot
                free = [s for s in self.slots if s.req is None and want in (None, s.id)]
                if not free:
                    return
                mtp = self._uses_mtp(req)
                # NextN would need the hidden states of a shared prefix, which are not kept
                share = self.opts.prefix_sharing and req.params.cache_prompt
                share = share and not (mtp and not self.drafter.shares_prefix)
                seq = self.pool.admit(req.prompt, self.n_tokens(req), self.opts.n_ctx, share)
                if seq is None:  # deferred until blocks come back
                    if not req.deferred:
                        req.deferred = True
                        self.metrics.deferrals.inc()
                    return
                self.queue.popleft()
                try:
                    self._start(free[0], req, seq, mtp)
                except Exception as e:
                    if free[0].req is None:  # failed before taking the slot
                        free[0].req, free[0].seq = req, seq
                    self._fail(free[0], e)

    def _start(self, s: Slot, req: Request, seq, mtp: bool) -> None:
        p = req.params
        s.req, s.seq, s.state, s.use_mtp = req, seq, "prefill", mtp
        s.n_eval, s.n_gen, s.prompt_s, s.decode_s = seq.n_past, 0, 0.0, 0.0
        s.history = list(req.prompt)
        s.text = TextOut(self.tok, p.stop)
        s.req_spec = type(s.req_spec)()
        s.n_requests += 1
        s.sampler = Sampler(p.sampler, n_prompt=len(req.prompt))
        s.logprobs = []
        s.constraint = None
        if p.grammar is not None:  # validated when parsed; grammar requests never draft
            from llmkit.core.decode.grammar import Constraint

            s.constraint = Constraint(self.tok, p.grammar)
        if mtp:
            s.draft = self.drafter.open(seq)
        if seq.n_shared:
            self.metrics.prefix_cache_hits.inc()

    # -- prompt ------------------------------------------------------------------------------------
    def _prefill(self, s: Slot) -> None:
        prompt = s.req.prompt
        ids = torch.tensor(prompt[s.n_eval : s.n_eval + self.opts.n_ubatch])
        t0 = time.perf_counter()
        bc = BatchCache(self.pool, [s.seq], [ids.numel()])
        p0 = s.seq.n_past
        out = self.model.forward(ids, bc, logits="last")
        if s.use_mtp:  # mirrored when the slot first drafts
            self.drafter.observe(s.draft, p0, ids, out.hidden)
        bc.publish()
        s.n_eval += ids.numel()
        s.prompt_s += time.perf_counter() - t0
        if s.n_eval == len(prompt):
            s.state = "decode"
            self._emit(s, [s.pick(out.logits[0])])

    # -- generation ------------------------------------------------------------------------------
    def _decode(self, slots: list[Slot]) -> None:
        n_mtp = sum(s.use_mtp for s in slots)
        k_step = self.policy.choose(len(slots) - n_mtp, n_mtp) if n_mtp else 0
        if n_mtp:
            self.metrics.n_draft.labels("mtp").set(k_step)
        self.metrics.busy_slots_per_decode.set(len(slots))
        try:
            plans = self._draft(slots, k_step)
        except Exception as e:  # the shared MTP draft: its drafting slots fail, the rest go on
            for s in slots:
                if s.use_mtp:
                    self._fail(s, e)
            plans = self._draft([s for s in slots if s.req is not None], 0)
        group: list[_Plan] = []
        for p in plans:  # slots packed in order into forwards of <= max_rows rows
            if group and sum(len(g.rows) for g in group) + len(p.rows) > self.opts.max_rows:
                self._verify(group)
                group = []
            group.append(p)
        if group:
            self._verify(group)

    def _draft(self, slots: list[Slot], k_step: int) -> list[_Plan]:
        """Every MTP slot's draft for this step, all drafting slots in the same MTP forwards."""
        jobs, owners = [], []
        for s in slots:
            room = self.opts.n_ctx - s.seq.n_past - 1  # verify rows occupy p0 .. p0 + k
            k = max(0, min(k_step, room, s.req.params.max_tokens - s.n_gen - 1))
            if s.use_mtp and k > 0:
                jobs.append(DraftJob(s.draft, s.last, k, s.sampler.pick_draft))
                owners.append(s)
        drafted = {}
        if jobs:
            t0 = time.perf_counter()
            self.drafter.catch_up([j.state for j in jobs])
            results = self.drafter.draft(jobs, self.opts.draft_p_min)
            dt = time.perf_counter() - t0
            self.policy.observe_draft(sum(j.k for j in jobs), dt)
            for s, r in zip(owners, results):
                s.decode_s += dt
                drafted[s.id] = (r.tokens, r.qs)
        plans = []
        for s in slots:
            drafts, qs = drafted.get(s.id, ([], []))
            plans.append(_Plan(s, [s.last, *drafts], drafts, qs, s.seq.n_past))
        return plans

    def _verify(self, group: list[_Plan]) -> None:
        toks = torch.tensor([t for p in group for t in p.rows])
        bc = BatchCache(self.pool, [p.slot.seq for p in group], [len(p.rows) for p in group])
        t0 = time.perf_counter()
        try:
            out = self.model.forward(toks, bc, logits="all")
        except Exception as e:  # the shared forward: every slot in it fails
            for p in group:
                self._fail(p.slot, e)
            return
        logits, h = out.logits, out.hidden
        dt = time.perf_counter() - t0
        self.metrics.n_decode.inc()
        if self.policy is not None:
            self.policy.observe_forward(toks.numel(), dt)
        r = 0
        for p in group:
            try:  # sampling, verifying, detokenizing: a failure ends this request only
                self._after_forward(p, toks, logits, h, r, dt)
            except Exception as e:
                self._fail(p.slot, e)
            r += len(p.rows)

    def _after_forward(self, p: _Plan, toks, logits, h, r: int, dt: float) -> None:
        s, n = p.slot, len(p.rows)
        s.decode_s += dt
        if s.use_mtp:
            n_acc, nxt = accept(s.sampler, logits[r : r + n], p.drafts, p.qs, s.history)
            self.pool.truncate(s.seq, p.p0 + n_acc + 1)
            kept = slice(r, r + n_acc + 1)
            self.drafter.observe(s.draft, p.p0, toks[kept], h[kept])
            s.req_spec.add(len(p.drafts), n_acc)
            s.total_spec.add(len(p.drafts), n_acc)
            self.metrics.speculative_round(len(p.drafts), n_acc)
            if p.drafts:
                self.policy.observe_accept(len(p.drafts), n_acc)
            out = [*p.drafts[:n_acc], nxt]
        else:
            out = [s.pick(logits[r])]
        self._emit(s, out)

    def _emit(self, s: Slot, toks: list[int]) -> None:
        """Hand sampled tokens to the client in order; finish at EOG, a stop sequence, max_tokens
        or a full context."""
        req = s.req
        for tok in toks:
            if self.tok.is_eog(tok) and not req.params.ignore_eos:
                s.logprobs = s.logprobs[:-1]  # the end-of-generation token is not part of the text
                return self._finish(s, "eog")
            s.history.append(tok)
            s.n_gen += 1
            delta = s.text.push(tok)
            if delta:
                req.emit(Event("text", delta, logprobs=s.take_logprobs()))
            if s.text.stopped_by is not None:
                return self._finish(s, "stop_sequence")
            if s.n_gen >= req.params.max_tokens:
                return self._finish(s, "length")
        s.last = toks[-1]
        if s.seq.n_past >= self.opts.n_ctx:  # no room to evaluate the last token
            self._finish(s, "length")

    def _finish(self, s: Slot, reason: str) -> None:
        req, m = s.req, self.metrics
        tail, lps = s.text.flush(), s.take_logprobs()
        if tail or lps:
            req.emit(Event("text", tail, logprobs=lps))
        req.emit(
            Event(
                "done",
                finish=reason,
                stop_sequence=s.text.stopped_by,
                prompt_tokens=len(req.prompt),
                completion_tokens=s.n_gen,
                timings={
                    "prompt_n": len(req.prompt) - s.seq.n_shared,
                    "cache_n": s.seq.n_shared,
                    "prompt_ms": s.prompt_s * 1e3,
                    "predicted_n": s.n_gen,
                    "predicted_ms": s.decode_s * 1e3,
                    "draft_n": s.req_spec.draft_tokens,
                    "draft_n_accepted": s.req_spec.accepted,
                    "id_slot": s.id,
                },
            )
        )
        m.requests_completed.inc()
        m.prompt_tokens.inc(len(req.prompt))
        m.prompt_tokens_cached.inc(s.seq.n_shared)
        m.prompt_seconds.inc(s.prompt_s)
        m.tokens_predicted.inc(s.n_gen)
        m.tokens_predicted_seconds.inc(s.decode_s)
        self._free(s)

    def _free(self, s: Slot) -> None:
        if s.seq is not None:
            self.pool.release(s.seq)
        if s.draft is not None:
            self.drafter.close(s.draft)
            s.draft = None
        s.req, s.seq, s.state, s.sampler, s.text = None, None, "idle", None, None

    # -- reporting --------------------------------------------------------------------------------
    def _publish_snapshot(self) -> None:
        """A consistent picture for /slots, /health and /metrics (read from other threads)."""
        with self.cv:
            deferred = len(self.queue)
        busy = sum(s.req is not None for s in self.slots)
        self.snapshot = {
            "slots": [s.describe() for s in self.slots],
            "requests_processing": busy,
            "requests_deferred": deferred,
            "kv": self.pool.stats(),
            "mtp": self.mtp_plan,
            "draft_policy": self.policy.describe() if self.policy else None,
        }
