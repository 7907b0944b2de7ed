"""Starting the ranks of a tensor-parallel run.

`llm run --tp N ...`: this process checks the model file and that it splits N ways, then starts
ranks 1..N-1 as `python -m llmkit <the same arguments>` with LLMKIT_TP_RANK / LLMKIT_TP_WORLD /
LLMKIT_TP_INIT in their environment (a file rendezvous in a fresh temp directory), and is rank 0
itself: the only rank that prints. Under `torchrun --nproc-per-node N -m llmkit run ...` every
rank joins from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT instead. Each rank's CPU threads
default to its share of the cores.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from typing import TYPE_CHECKING

from llmkit.errors import LlmkitError

if TYPE_CHECKING:  # torch: loaded only when ranks start
    from llmkit.core.distributed.group import Group

ENV_RANK, ENV_WORLD, ENV_INIT = "LLMKIT_TP_RANK", "LLMKIT_TP_WORLD", "LLMKIT_TP_INIT"
_live: list[Group] = []


def launched_world() -> int | None:
    """The world size this process was started into (a spawned rank or torchrun), else None."""
    for key in (ENV_WORLD, "WORLD_SIZE"):
        if os.environ.get(key):
            return int(os.environ[key])
    return None


def _set_threads(threads: int, world: int) -> None:
    """-t, or this rank's share of the cores (the native pool and torch's)."""
    from llmkit.kernels import ops

    ops.set_threads(threads if threads > 0 else max(1, (os.cpu_count() or 1) // world))


def start(tp: int, argv: list[str], threads: int = 0, device: str = "cpu",
          check=None) -> Group | None:  # fmt: skip
    """This process's Group for `--tp tp` (None when tp is 1 and no launcher started us).
    `check()`: rank 0's validation before any other rank exists (raises LlmkitError)."""
    for g in _live:  # an earlier run of this process that ended in an error
        g.abort()
    _live.clear()
    world = launched_world()
    if world is not None and world > 1:
        if tp not in (1, world):
            raise LlmkitError(f"--tp {tp} does not match the {world} launched ranks")
        if os.environ.get(ENV_RANK):
            rank, init = int(os.environ[ENV_RANK]), os.environ[ENV_INIT]
        else:  # torchrun
            # every rank checks the file while loading (Group.agree): one error for all ranks
            rank, init = int(os.environ["RANK"]), "env://"
        from llmkit.core.distributed.group import Group

        group = Group.join(rank, world, init, device)
        _live.append(group)
        if check is not None and not os.environ.get(ENV_RANK):  # torchrun: nobody checked yet
            group.agree(check)  # a bad file on any rank: the same error on every rank
        _set_threads(threads, world)
        return group
    if tp < 1:
        raise LlmkitError(f"--tp must be >= 1, got {tp}")
    if tp == 1:
        return None
    if check is not None:
        check()
    tmp = tempfile.mkdtemp(prefix="llmkit-tp-")
    init = f"file://{os.path.join(tmp, 'rendezvous')}"
    children = []
    for rank in range(1, tp):
        env = dict(os.environ, **{ENV_RANK: str(rank), ENV_WORLD: str(tp), ENV_INIT: init})
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "llmkit", *argv],
                env=env,
                stdout=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        )
    try:
        from llmkit.core.distributed.group import Group

        group = Group.join(0, tp, init, device)
    except BaseException:
        for p in children:
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    group.children = children
    _set_threads(threads, tp)
    _live.append(group)
    atexit.register(shutil.rmtree, tmp, True)
    return group


def finish(group: Group | None) -> None:
    """The run is over on this rank: leave the group (rank 0 waits for its children)."""
    if group is None:
        return
    if group in _live:
        _live.remove(group)
    group.close()


@atexit.register
def _abort_live() -> None:
    for g in _live:
        g.abort()


def begin_run(tp: int, mode: str, threads: int, device: str | None, model, model_draft,
              mtp: bool, moe_n_expert) -> Group | None:  # fmt: skip
    """`llm run --tp`: rank 0 checks the model file and the split, then the ranks start."""

    def check():
        from llmkit.core.distributed.load import check_tp
        from llmkit.core.model.catalog import resolve_model

        draft = resolve_model(model_draft) if model_draft else None
        check_tp(resolve_model(model), tp, mode, mtp, draft, moe_n_expert)

    if tp > 1 and (device or "cpu") not in ("cpu", "cuda"):
        raise LlmkitError(f"--tp: unknown device {device!r} (use cpu or cuda)")
    return start(tp, sys.argv[1:], threads, device or "cpu", check)


def rank_plans(group: Group, llm) -> list[dict]:
    """Every rank's weight and KV bytes, in rank order (a collective: every rank calls it)."""
    spec = llm.spec
    draft = 0
    if spec is not None and hasattr(spec.drafter, "caches"):
        draft = sum(c.nbytes() for c in spec.drafter.caches)
    mine = {
        "rank": group.rank,
        "weights_bytes": llm.lm.weights_bytes(),
        "kv_bytes": llm.cache.nbytes(),
        "draft_kv_bytes": draft,
        "kv_heads": {il: kv.n_head_kv for il, kv in sorted(llm.lm.model.kv_layout().items())[:1]},
    }
    return group.gather_objects(mine)


def parse_layer_split(mode: str, shares: str | None, device: str | None) -> tuple:
    """(devices, shares) for --split-mode layer, () for none."""
    if mode not in ("none", "layer"):
        raise LlmkitError(f"--split-mode must be none or layer, got {mode!r}")
    if mode == "none":
        if shares:
            raise LlmkitError("--tensor-split needs --split-mode layer")
        return ()
    try:
        w = [float(s) for s in (shares or "1,1").split(",")]
    except ValueError:
        raise LlmkitError(
            f"--tensor-split must be numbers like 1,1 or 3,1, got {shares!r}"
        ) from None
    if len(w) < 2 or min(w) < 0 or sum(w) <= 0:
        raise LlmkitError(f"--tensor-split needs two or more shares >= 0, got {shares!r}")
    if (device or "cpu") == "cuda":
        import torch

        n = torch.cuda.device_count()
        if len(w) > n:
            raise LlmkitError(f"--tensor-split has {len(w)} shares but {n} CUDA devices exist")
        return tuple(f"cuda:{i}" for i in range(len(w))), tuple(w)
    if (device or "cpu") != "cpu":
        raise LlmkitError(f"unknown device {device!r} (use cpu or cuda)")
    return tuple("cpu" for _ in w), tuple(w)
