"""Load test of `llm serve`: mixed good and bad requests from several client threads, then checks.

    python scripts/load_test_serve.py                       # a tiny test model, 1000 requests
    python scripts/load_test_serve.py -m smollm2-135m --requests 2000 --clients 8
    python scripts/load_test_serve.py --url http://127.0.0.1:8080 --pid 1234

Without --url a server is started here (`llm serve --metrics`, a subprocess on a free loopback
port). The clients send chat and completion requests (streamed and not, both APIs), malformed
JSON, wrong field types, out-of-range seeds, 200k-deep JSON, oversized bodies, and streams they
hang up after the first chunk. A warm-up round comes first. Checked afterwards:
  - every answer has the status its kind expects (no 500 at all: nothing here is poisoned);
  - no slot leak: every slot idle, no KV block used or reserved, nothing queued;
  - /metrics deltas match what the clients saw: completed + cancelled = good + hung up, and the
    prompt/generated token counters equal the usage the clients were sent when no hang-up raced
    its request's end;
  - the server's RSS after the run is within --rss-limit-mib of the RSS after warm-up;
  - the server printed no traceback.
A JSON summary goes to stdout; the exit code is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import itertools
import json
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
KINDS = [
    "chat",
    "chat_stream",
    "completion",
    "completion_stream",
    "messages",
    "malformed_json",
    "wrong_type",
    "huge_seed",
    "hangup",
    "oversized",
    "deep_json",
]
EXPECT = {k: 200 for k in KINDS[:5]}
EXPECT.update(malformed_json=400, wrong_type=400, huge_seed=400, oversized=413, deep_json=400)
EXPECT["hangup"] = 200
WEIGHTS = [14, 14, 12, 12, 10, 8, 8, 6, 8, 4, 4]
WRONG = [
    {"temperature": "hot"},
    {"temperature": -1},
    {"top_p": 2},
    {"top_k": True},
    {"max_tokens": 0},
    {"max_tokens": "8"},
    {"stream": "yes"},
    {"seed": 1.5},
    {"stop": [7]},
    {"n": 0},
    {"min_p": -1},
]
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()


def words(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))


def one(c: httpx.Client, kind: str, rng: random.Random, max_body: int) -> dict:
    """Send one request of this kind -> {"status", "prompt", "completion"} (usage when 200)."""
    msgs = [{"role": "user", "content": words(rng)}]
    n = rng.randint(1, 8)
    chat = {"messages": msgs, "max_tokens": n, "temperature": rng.choice([0, 0.7])}
    if kind == "chat":
        r = c.post("/v1/chat/completions", json=chat)
        return _usage(r, "prompt_tokens", "completion_tokens")
    if kind == "completion":
        r = c.post("/v1/completions", json={"prompt": words(rng), "max_tokens": n, "seed": n})
        return _usage(r, "prompt_tokens", "completion_tokens")
    if kind == "messages":
        r = c.post("/v1/messages", json={"max_tokens": n, "messages": msgs})
        return _usage(r, "input_tokens", "output_tokens")
    if kind in ("chat_stream", "completion_stream"):
        path = "/v1/chat/completions" if kind == "chat_stream" else "/v1/completions"
        body = chat if kind == "chat_stream" else {"prompt": words(rng), "max_tokens": n}
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with c.stream("POST", path, json=body) as r:
            lines = [x for x in r.iter_lines() if x.startswith("data: ")]
        if r.status_code != 200 or lines[-1:] != ["data: [DONE]"]:
            return {"status": r.status_code if r.status_code != 200 else "truncated_stream"}
        u = json.loads(lines[-2][6:])["usage"]
        return {"status": 200, "prompt": u["prompt_tokens"], "completion": u["completion_tokens"]}
    if kind == "hangup":
        body = {"prompt": words(rng), "max_tokens": 200, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code == 200:
                next(r.iter_lines())
        return {"status": r.status_code}
    if kind == "malformed_json":
        raw = rng.choice([b'{"messages": [', b"nope", b'{"a": 1,}', b"", b"\xff\xfe"])
        r = c.post("/v1/chat/completions", content=raw)
    elif kind == "wrong_type":
        r = c.post("/v1/chat/completions", json={**chat, **rng.choice(WRONG)})
    elif kind == "huge_seed":
        r = c.post("/v1/completions", json={"prompt": "x", "seed": rng.choice([2**64, 2**70, -9])})
    elif kind == "oversized":
        r = c.post("/v1/completions", json={"prompt": "w" * (max_body + 10)})
    else:  # deep_json
        depth = rng.choice([100, 200_000])
        raw = '{"prompt": "x", "stop": ' + "[" * depth + "]" * depth + "}"
        r = c.post("/v1/completions", content=raw.encode())
    return {"status": r.status_code}


def _usage(r: httpx.Response, p: str, c: str) -> dict:
    if r.status_code != 200:
        return {"status": r.status_code}
    u = r.json()["usage"]
    return {"status": 200, "prompt": u[p], "completion": u[c]}


def run_clients(url: str, n: int, clients: int, seed: int, max_body: int) -> list[dict]:
    counter, lock = itertools.count(), threading.Lock()

    def client(w: int) -> list[dict]:
        rng, out = random.Random(seed * 1000 + w), []
        with httpx.Client(base_url=url, timeout=120) as c:
            while True:
                with lock:
                    i = next(counter)
                if i >= n:
                    return out
                kind = rng.choices(KINDS, WEIGHTS)[0]
                try:
                    res = one(c, kind, rng, max_body)
                except Exception as e:  # a transport error is an outcome too
                    res = {"status": f"{type(e).__name__}"}
                out.append({"kind": kind, **res})

    with cf.ThreadPoolExecutor(clients) as ex:
        return [r for rs in ex.map(client, range(clients)) for r in rs]


def metrics(url: str) -> dict[str, float]:
    out: dict[str, float] = collections.defaultdict(float)
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("llamacpp:"):
            name, v = line.rsplit(" ", 1)
            out[name.split("{")[0]] += float(v)
    return out


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def wait_idle(url: str, timeout: float = 30.0) -> dict:
    t0, snap = time.monotonic(), {}
    while time.monotonic() - t0 < timeout:
        snap = httpx.get(url + "/slots", timeout=30).json()
        if snap["requests_processing"] == 0 and snap["requests_deferred"] == 0:
            break
        time.sleep(0.05)
    return snap


class LocalServer:
    """`llm serve` in a subprocess; its stderr is drained in a thread (tracebacks counted)."""

    def __init__(self, model: str, slots: int, ctx: int, max_body: int):
        code = "import sys; from llmkit.cli.app import main; sys.argv[0] = 'llm'; main()"
        cmd = [sys.executable, "-c", code, "serve", "-m", model, "--port", "0", "--metrics"]
        cmd += ["-np", str(slots), "-c", str(ctx), "--max-body-bytes", str(max_body)]
        self.p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        self.tracebacks = 0
        self.url = None
        for line in self.p.stderr:
            self.log.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                break
        if self.url is None:
            raise SystemExit("server did not start:\n" + "".join(self.log))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.p.stderr:
            self.log.append(line)
            self.tracebacks += line.startswith("Traceback")

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()


def tiny_model(dirname: str) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import write_tiny_llama

    return str(write_tiny_llama(Path(dirname) / "tiny-llama.gguf", seed=2))


def tally(results: list[dict]) -> dict:
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in results:
        by_kind[r["kind"]][str(r["status"])] += 1
    return {k: dict(v) for k, v in sorted(by_kind.items())}


def check(results, m0, m1, snap, rss0, rss1, args, tracebacks) -> tuple[dict, list[str]]:
    fail = []
    wrong = [r for r in results if r["status"] != EXPECT[r["kind"]]]
    n500 = sum(r["status"] == 500 for r in results)
    if wrong:
        fail.append(f"{len(wrong)} answers with an unexpected status, e.g. {wrong[:3]}")
    busy = [s["id"] for s in snap["slots"] if s["state"] != "idle"]
    kv_used = {
        g: (v["blocks_used"], v.get("blocks_reserved", 0)) for g, v in snap["kv"]["groups"].items()
    }
    leak = bool(busy) or snap["requests_deferred"] != 0 or any(a or b for a, b in kv_used.values())
    if leak:
        fail.append(f"slot leak: busy slots {busy}, KV blocks (used, reserved) {kv_used}")
    d = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in set(m1) | set(m0)}
    good = [r for r in results if EXPECT[r["kind"]] == 200 and r["kind"] != "hangup"]
    ok_good = [r for r in good if r["status"] == 200]
    hangups = sum(r["kind"] == "hangup" and r["status"] == 200 for r in results)
    completed = d.get("llamacpp:requests_completed_total", 0)
    cancelled = d.get("llamacpp:requests_cancelled_total", 0)
    if completed + cancelled != len(ok_good) + hangups or completed < len(ok_good):
        fail.append(
            f"metrics: completed {completed} + cancelled {cancelled} != "
            f"{len(ok_good)} good + {hangups} hang-ups"
        )
    if cancelled == hangups:  # no hang-up raced its request's end: token counters are exact
        for name, key in (
            ("prompt_tokens_total", "prompt"),
            ("tokens_predicted_total", "completion"),
        ):
            want = sum(r[key] for r in ok_good)
            if d.get("llamacpp:" + name, 0) != want:
                fail.append(
                    f"metrics: {name} grew by {d.get('llamacpp:' + name)}, clients saw {want}"
                )
    if d.get("llamacpp:requests_failed_total", 0):
        fail.append(f"{d['llamacpp:requests_failed_total']} requests failed inside the engine")
    growth = None if rss0 is None or rss1 is None else rss1 - rss0
    if growth is not None and growth > args.rss_limit_mib:
        fail.append(f"RSS grew by {growth:.1f} MiB after warm-up (limit {args.rss_limit_mib})")
    if tracebacks:
        fail.append(f"the server printed {tracebacks} traceback(s)")
    figures = {
        "unexpected_500": n500,
        "unexpected": len(wrong),
        "slot_leak": leak,
        "metrics": {
            "requests_completed": completed,
            "requests_cancelled": cancelled,
            "requests_failed": d.get("llamacpp:requests_failed_total", 0),
            "good_ok": len(ok_good),
            "hangups": hangups,
            "prompt_tokens": d.get("llamacpp:prompt_tokens_total", 0),
            "tokens_predicted": d.get("llamacpp:tokens_predicted_total", 0),
        },
        "rss_mib": {"after_warmup": rss0, "end": rss1, "growth": growth},
    }
    return figures, fail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="test this running server (needs --metrics) instead")
    ap.add_argument("--pid", type=int, help="with --url: the server's pid, for its RSS")
    ap.add_argument("-m", "--model", default="tiny", help="GGUF, catalog name, or tiny")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=0, help="warm-up requests (default 2x clients)")
    ap.add_argument("--slots", type=int, default=4, help="-np of the server started here")
    ap.add_argument("--ctx", type=int, default=512, help="-c of the server started here")
    ap.add_argument("--max-body", type=int, default=1 << 20, help="its --max-body-bytes")
    ap.add_argument("--rss-limit-mib", type=float, default=50.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    server, pid, url = None, args.pid, args.url
    with tempfile.TemporaryDirectory() as tmp:
        if url is None:
            model = tiny_model(tmp) if args.model == "tiny" else args.model
            server = LocalServer(model, args.slots, args.ctx, args.max_body)
            url, pid = server.url, server.p.pid
        try:
            t0 = time.perf_counter()
            run_clients(
                url, args.warmup or 2 * args.clients, args.clients, args.seed + 1, args.max_body
            )
            wait_idle(url)
            m0, rss0 = metrics(url), rss_mib(pid)
            t1 = time.perf_counter()
            results = run_clients(url, args.requests, args.clients, args.seed, args.max_body)
            duration = time.perf_counter() - t1
            snap = wait_idle(url)
            m1, rss1 = metrics(url), rss_mib(pid)
            time.sleep(0.2)  # let the log drain
            tb = server.tracebacks if server else 0
            figures, fail = check(results, m0, m1, snap, rss0, rss1, args, tb)
        finally:
            if server is not None:
                server.stop()
    by_status = collections.Counter(str(r["status"]) for r in results)
    summary = {
        "ok": not fail,
        "url": url,
        "requests": len(results),
        "clients": args.clients,
        "duration_s": round(duration, 2),
        "total_s": round(time.perf_counter() - t0, 2),
        "requests_per_s": round(len(results) / duration, 1),
        "by_status": dict(sorted(by_status.items())),
        "by_kind": tally(results),
        **figures,
        "failures": fail,
    }
    if fail and server is not None:
        summary["server_log_tail"] = list(server.log)[-20:]
    print(json.dumps(summary, indent=2))
    return 0 if not fail else 1


if __name__ == "__main__":
    sys.exit(main())
