"""`llm serve --tp N`: the server runs on rank 0 and drives the other ranks in lockstep.

Every rank builds the same `Engine` (same options, its own shard of the model, a paged KV pool
over its own KV heads); only rank 0 listens and schedules. The pool's bookkeeping is
deterministic (which blocks a sequence gets, copy-on-write, prefix sharing, LRU eviction depend
only on the sequence of calls), so rank 0 sends each call that changes it as a small op and the
other ranks replay it on their own pools, which therefore hold the same block tables:

  admit(id, prompt, n_tokens, n_ctx, share)   a request's sequence (or a deferral: replayed too,
                                              it touches the LRU order)
  publish(id) / truncate(id, p) / release(id)
  forward(ids, seq ids, counts, logits, n_past)  a BatchCache over those sequences and one
                                              forward on every rank (its collectives pair up)
  embed(ids lists, pooling)                   /v1/embeddings: core/embed.py's `embed` on every
                                              rank, each over its own shard (fresh caches
                                              outside the pool; same inputs, same forwards)
  noop                                        a heartbeat while idle (collectives time out)
  stop

Sampling stays on rank 0 (the logits are whole on every rank after the vocab gather). MTP
drafting is refused under --tp.
"""

from __future__ import annotations

import copy
import sys
import threading
import time

import torch

from llmkit.core.cache.batch import BatchCache
from llmkit.core.embed import embed
from llmkit.errors import LlmkitError


class MirroredPool:
    """Rank 0's PagedKV: every change is broadcast as an op before it runs here."""

    def __init__(self, pool, lead: Leader):
        self._pool, self._lead, self._next = pool, lead, 0

    def __getattr__(self, name):  # prepare / write / read / stats / the layout: as they are
        return getattr(self._pool, name)

    def admit(self, prompt, n_tokens, n_ctx, share=True):
        with self._lead.lock:
            sid, self._next = self._next, self._next + 1
            self._lead.send(("admit", sid, list(prompt), n_tokens, n_ctx, share))
            seq = self._pool.admit(prompt, n_tokens, n_ctx, share)
            if seq is not None:
                seq.tp_id = sid
            return seq

    def _op(self, kind: str, seq, *args):
        with self._lead.lock:
            self._lead.send((kind, seq.tp_id, *args))
            return getattr(self._pool, kind)(seq, *args)

    def publish(self, seq):
        return self._op("publish", seq)

    def truncate(self, seq, p: int):
        return self._op("truncate", seq, p)

    def release(self, seq):
        return self._op("release", seq)


class MirroredModel:
    """Rank 0's model: each forward over the pool is announced, then run on every rank."""

    def __init__(self, model, pool: MirroredPool, lead: Leader):
        self._model, self._pool, self._lead = model, pool, lead

    def __getattr__(self, name):
        return getattr(self._model, name)

    def forward(self, ids: torch.Tensor, cache, logits="last"):
        if not (isinstance(cache, BatchCache) and cache.pool is self._pool):
            raise LlmkitError("not available under --tp: only the slots' forwards run sharded")
        with self._lead.lock:
            seqs = [s.tp_id for s in cache.seqs]
            n_past = [s.n_past for s in cache.seqs]
            self._lead.send(("forward", ids.tolist(), seqs, cache.counts, logits, n_past))
            return self._model.forward(ids, cache, logits=logits)


class MirroredEmbed:
    """Rank 0's /v1/embeddings: announced as an op, then run here over the unwrapped model (the
    other ranks run the same `embed` over their shards, so every collective pairs up)."""

    def __init__(self, lm, lead: Leader):
        self._lm, self._lead = lm, lead

    def __call__(self, ids: list[list[int]], pooling: str) -> list[list[float]]:
        with self._lead.lock:
            self._lead.send(("embed", ids, pooling))
            return embed(self._lm, ids, pooling)


class Leader:
    """Rank 0's side: the op channel, its lock (ops and their collectives never interleave with
    the heartbeat) and the heartbeat thread."""

    def __init__(self, group):
        self.group, self.lock = group, threading.RLock()
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="llm-tp-beat", daemon=True)

    def send(self, op) -> None:
        self.group.broadcast_object(op)
        self.last = time.monotonic()

    def _heartbeat(self) -> None:
        every = max(0.5, self.group.timeout / 4)
        while not self._stop.wait(every / 4):
            with self.lock:
                if self._stop.is_set():
                    return
                if time.monotonic() - self.last >= every:
                    try:
                        self.send(("noop",))
                    except LlmkitError as e:  # a rank is gone: the next forward fails too
                        print(f"llm serve: {e}", file=sys.stderr, flush=True)
                        return

    def attach(self, engine) -> None:
        """Route the engine's pool and model through the op channel; start the heartbeat."""
        if engine.drafter is not None:
            raise LlmkitError("--tp: llm serve does not draft (--mtp) under tensor parallelism")
        engine.embed = MirroredEmbed(copy.copy(engine.lm), self)  # over the model as loaded
        engine.pool = MirroredPool(engine.pool, self)
        engine.model = MirroredModel(engine.model, engine.pool, self)
        engine.lm.model = engine.model  # any other forward outside the slots: refused
        self._beat.start()

    def stop(self) -> None:
        """Tell the other ranks the server is done (they return from `follow`)."""
        self._stop.set()
        with self.lock:
            self.send(("stop",))
        self._beat.join(timeout=5)


def follow(group, engine) -> None:
    """Ranks 1..N-1: replay rank 0's ops on this rank's pool and shard until it stops. A replayed
    call that fails here failed on rank 0 as well (same state, same call): it is skipped."""
    if engine.drafter is not None:
        raise LlmkitError("--tp: llm serve does not draft (--mtp) under tensor parallelism")
    pool, model, seqs = engine.pool, engine.model, {}
    with torch.inference_mode():
        while True:
            op = group.broadcast_object(None)
            kind = op[0]
            if kind == "stop":
                return
            if kind == "noop":
                continue
            try:
                if kind == "admit":
                    seq = pool.admit(*op[2:])
                    if seq is not None:
                        seqs[op[1]] = seq
                elif kind == "forward":
                    _, ids, sids, counts, logits, n_past = op
                    batch = [seqs[i] for i in sids]
                    if [s.n_past for s in batch] != n_past:
                        raise SystemExit(
                            f"error: tensor parallel: rank {group.rank}'s KV pool diverged "
                            "from rank 0's"
                        )
                    bc = BatchCache(pool, batch, counts)
                    model.forward(torch.tensor(ids, dtype=torch.long), bc, logits=logits)
                elif kind == "embed":
                    embed(engine.lm, op[1], op[2])
                elif kind == "release":
                    pool.release(seqs.pop(op[1]))
                else:  # publish / truncate
                    getattr(pool, kind)(seqs[op[1]], *op[2:])
            except LlmkitError as e:
                if str(e).startswith("tensor parallel:"):  # a collective failed: rank 0 is gone
                    raise
