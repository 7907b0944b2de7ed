"""The ranks of one tensor-parallel run and the collectives the sharded model uses.

Every collective is a torch.distributed call on the default group (gloo on a CPU, NCCL on GPUs)
under a timeout (LLMKIT_TP_TIMEOUT seconds, default 120): a rank that dies or stops answering
turns into a one-line `LlmkitError` on every other rank, never a hang. Reductions never use an
all-reduce: partial results are all-gathered and summed in rank order on every rank, so every
rank holds the same bits (and where only one rank contributes a value, the bits of that value).

Ranks are made in two ways:
  * `llm run --tp N` (core/distributed/launch.py): this process is rank 0; ranks 1..N-1 are
    `python -m llmkit` children with the same arguments; rendezvous over a file.
  * `torchrun --nproc-per-node N -m llmkit run ...`: RANK / WORLD_SIZE / MASTER_ADDR from the env.
"""

from __future__ import annotations

import datetime
import os
import pickle
from collections.abc import Callable

import torch
import torch.distributed as dist

from llmkit.errors import LlmkitError

DEFAULT_TIMEOUT_S = 120.0


def timeout_s() -> float:
    raw = os.environ.get("LLMKIT_TP_TIMEOUT", "")
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise LlmkitError(f"LLMKIT_TP_TIMEOUT must be a number of seconds, got {raw!r}") from None


class Group:
    """This process's place among `world` ranks. `device`: where its activations live (the
    collectives' tensors are moved there: NCCL needs them on the GPU)."""

    def __init__(self, rank: int, world: int, device: torch.device, timeout: float):
        self.rank, self.world, self.device, self.timeout = rank, world, device, timeout
        self.children: list = []  # the spawned ranks (rank 0 of `llm run --tp` only)
        self.closed = False

    @classmethod
    def join(cls, rank: int, world: int, init_method: str, device: str = "cpu") -> Group:
        """Join the default process group (every rank calls this with the same init_method)."""
        t = timeout_s()
        dev = torch.device(device)
        if dev.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", rank))
            dev = torch.device("cuda", local % max(1, torch.cuda.device_count()))
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dist.is_initialized():  # a previous run of this process that ended in an error
            dist.destroy_process_group()
        try:
            dist.init_process_group(
                backend, init_method=init_method, rank=rank, world_size=world,
                timeout=datetime.timedelta(seconds=t),
            )  # fmt: skip
        except Exception as e:
            raise LlmkitError(f"tensor parallel: rank {rank} could not join: {_short(e)}") from e
        return cls(rank, world, dev, t)

    # -- collectives --------------------------------------------------------------------------

    def _guard(self, fn: Callable, what: str):
        try:
            return fn()
        except LlmkitError:
            raise
        except Exception as e:  # gloo / NCCL: a peer closed the connection or timed out
            raise LlmkitError(
                f"tensor parallel: {what} failed on rank {self.rank} (another rank exited or "
                f"did not answer within {self.timeout:g} s): {_short(e)}"
            ) from e

    def all_gather(self, t: torch.Tensor, dim: int = -1, sizes: list[int] | None = None):
        """Concatenate every rank's `t` along `dim` in rank order; `sizes` (each rank's extent
        along dim) when they differ: the shorter ones are padded for the transfer."""
        src = t.contiguous()
        home = src.device
        if self.world == 1:
            return src
        dim = dim % src.dim()
        big = max(sizes) if sizes else src.shape[dim]
        if src.shape[dim] < big:
            pad = list(src.shape)
            pad[dim] = big - src.shape[dim]
            src = torch.cat((src, src.new_zeros(pad)), dim)
        src = src.to(self.device)
        out = [torch.empty_like(src) for _ in range(self.world)]
        self._guard(lambda: dist.all_gather(out, src), "all-gather")
        if sizes:
            out = [o.narrow(dim, 0, n) for o, n in zip(out, sizes, strict=True)]
        return torch.cat(out, dim).to(home)

    def gather_list(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `t` (same shape), in rank order."""
        if self.world == 1:
            return [t]
        src = t.contiguous().to(self.device)
        out = [torch.empty_like(src) for _ in range(self.world)]
        self._guard(lambda: dist.all_gather(out, src), "all-gather")
        return [o.to(t.device) for o in out]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of `t`, added in rank order: the same bits on every rank."""
        parts = self.gather_list(t)
        acc = parts[0]
        for p in parts[1:]:
            acc = acc + p
        return acc

    def broadcast_object(self, obj=None):
        """Rank 0's `obj` on every rank (pickled, sent as a byte tensor)."""
        if self.world == 1:
            return obj
        data = pickle.dumps(obj) if self.rank == 0 else b""
        n = torch.tensor([len(data)], dtype=torch.long, device=self.device)
        self._guard(lambda: dist.broadcast(n, 0), "broadcast")
        buf = torch.zeros(int(n), dtype=torch.uint8, device=self.device)
        if self.rank == 0:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        self._guard(lambda: dist.broadcast(buf, 0), "broadcast")
        return pickle.loads(buf.cpu().numpy().tobytes()) if self.rank else obj

    def gather_objects(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        self._guard(lambda: dist.all_gather_object(out, obj), "all-gather")
        return out

    def agree(self, fn: Callable):
        """Run fn() on every rank; when it raises a user error on any rank, every rank raises
        the same one-line error (the lowest failing rank's), so no rank waits for the others."""
        err = None
        try:
            result = fn()
        except (LlmkitError, OSError) as e:
            err, result = f"{e}", None
        errors = self.gather_objects(err)
        bad = [(r, m) for r, m in enumerate(errors) if m is not None]
        if bad:
            r, m = bad[0]
            raise LlmkitError(m if r == self.rank or self.world == 1 else f"rank {r}: {m}")
        return result

    def close(self) -> None:
        """Leave the group; rank 0 of a spawned run also waits for its children (and ends any
        still running after the timeout)."""
        if self.closed:
            return
        self.closed = True
        if dist.is_initialized():
            dist.destroy_process_group()
        codes = []
        for p in self.children:
            try:
                codes.append(p.wait(timeout=self.timeout))
            except Exception:
                p.kill()
                codes.append(p.wait())
        bad = [(r + 1, c, _last_line(p)) for r, (p, c) in enumerate(zip(self.children, codes)) if c]
        if bad:
            raise LlmkitError(
                "tensor parallel: "
                + ", ".join(f"rank {r} exited with code {c}{m}" for r, c, m in bad)
            )

    def abort(self) -> None:
        """After an error on this rank: end the children now (their collectives would only time
        out) and leave the group."""
        for p in self.children:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.children = []
        self.closed = True
        if dist.is_initialized():
            dist.destroy_process_group()


def _short(e: Exception) -> str:
    line = str(e).strip().splitlines()
    return (line[0] if line else type(e).__name__)[:300]


def _last_line(proc) -> str:
    """': <the last line a spawned rank wrote to stderr>', or ''."""
    path = getattr(proc, "log_path", None)
    try:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").strip().splitlines()
    except (OSError, TypeError):
        return ""
    return f": {lines[-1][:300]}" if lines else ""
