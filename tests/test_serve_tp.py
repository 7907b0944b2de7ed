"""`llm serve --tp 2`: a live server whose rank 0 drives rank 1 in lockstep (gloo on the CPU):
the same greedy text as one process, concurrent slots, prefix sharing and an idle spell longer
than the collectives' timeout (the heartbeat), and /v1/embeddings with the same fp32 bits."""

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from cli_run import llm
from tiny_models import write_tiny_llama

LONG = "the cat sat on the mat and the dog ran after the cat " * 3


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("stp") / "llama.gguf", n_layer=3, tied=False)


def _start(model, tmp_path, *extra, env=None):
    cmd = [sys.executable, "-m", "llmkit", "serve", "-m", str(model), "--port", "0", "-c", "256"]
    p = subprocess.Popen([*cmd, *map(str, extra)], stderr=subprocess.PIPE, text=True,
                         cwd=tmp_path, env=env)  # fmt: skip
    lines, t0 = [], time.monotonic()
    while time.monotonic() - t0 < 90:
        line = p.stderr.readline()
        lines.append(line)
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            return p, m.group(1)
        if not line:
            break
    p.kill()
    raise AssertionError("server did not start: " + "".join(lines))


def _post(url, path, body):
    req = urllib.request.Request(url + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    try:
        return 200, json.loads(urllib.request.urlopen(req, timeout=60).read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _complete(url, prompt):
    code, body = _post(url, "/completion", {"prompt": prompt, "n_predict": 16, "temperature": 0})
    assert code == 200, body
    return body["content"]


def _embed(url, inputs, fmt="float"):
    code, body = _post(url, "/v1/embeddings", {"input": inputs, "encoding_format": fmt})
    assert code == 200, body
    return [d["embedding"] for d in body["data"]]


def test_serve_tp2_matches_tp1(model, tmp_path):
    prompts = ["the cat sat", "hello world", LONG, LONG + "and then"]
    texts = ["the cat sat", LONG, "hello world"]
    p, url = _start(model, tmp_path)
    try:
        ref = [_complete(url, q) for q in prompts]
        ref_emb, ref_b64 = _embed(url, texts), _embed(url, "hello world", "base64")
    finally:
        p.terminate()
        p.wait(30)
    env = dict(os.environ, LLMKIT_TP_TIMEOUT="3")
    p, url = _start(model, tmp_path, "--tp", 2, "-np", 3, env=env)
    try:
        with ThreadPoolExecutor(3) as ex:  # three slots decoding in the same forwards
            got = list(ex.map(lambda q: _complete(url, q), prompts))
        assert got == ref and len(set(ref)) > 1
        time.sleep(4)  # idle past the collectives' timeout: the heartbeat keeps rank 1 waiting
        assert _complete(url, LONG) == ref[2]  # and a cached prefix, shared on both ranks
        with urllib.request.urlopen(url + "/slots", timeout=30) as r:
            slots = json.loads(r.read())
        assert len(slots["slots"]) == 3 and slots["kv"]["prefix_hits"] >= 1
        # /v1/embeddings: every rank runs the same forwards over its shard; exact mode keeps
        # the fp32 bits (the base64 encoding carries them as they are)
        emb = _embed(url, texts)
        assert emb == ref_emb and len(emb) == 3 and len(emb[0]) > 1 and emb[0] != emb[2]
        assert _embed(url, "hello world", "base64") == ref_b64
        assert _complete(url, "hello world") == ref[1]  # still in step after the embeddings
    finally:
        p.terminate()
        p.wait(30)
    assert p.returncode is not None


def test_serve_tp_refuses_mtp(capsys, monkeypatch, model):
    rc, _, err = llm(capsys, monkeypatch, "serve", "-m", model, "--tp", 2, "--mtp")
    assert rc == 1
    assert err.strip().splitlines()[-1] == (
        "error: --tp: llm serve does not draft (--mtp) under tensor parallelism"
    )
