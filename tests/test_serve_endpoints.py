"""llama-server's utility endpoints on a live `llm serve`: /tokenize, /detokenize, /apply-template,
/props, /completion (native, streamed and not), /v1/embeddings (official openai client),
/v1/messages/count_tokens (official anthropic client), CORS, the chat page at /, and the install
messages (no fastapi: one line; no prometheus_client needed without --metrics)."""

import json
import subprocess
import sys

import httpx
import openai
import pytest

from llmkit.core.embed import embed
from llmkit.core.serve.server import HttpOptions
from serve_util import live_server, sdk_clients
from tiny_step35 import write_tiny_step35

MSGS = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_tiny_step35(tmp_path_factory.mktemp("ep") / "s35.gguf", seed=0, layout="trunk")


@pytest.fixture(scope="module")
def server(model_path):
    with live_server(model_path, http=HttpOptions(port=0), n_slots=2, n_ctx=256) as s:
        yield s


def _post(server, path, body):
    return httpx.post(server.url + path, json=body)


def test_tokenize_and_detokenize_round_trip(server):
    r = _post(server, "/tokenize", {"content": "hello world"}).json()
    assert r["tokens"] == server.prompter.tok.encode("hello world", add_special=False)
    with_bos = _post(server, "/tokenize", {"content": "hello world", "add_special": True}).json()
    assert len(with_bos["tokens"]) >= len(r["tokens"])
    pieces = _post(server, "/tokenize", {"content": "hello world", "with_pieces": True}).json()
    assert [p["id"] for p in pieces["tokens"]] == r["tokens"]
    assert "".join(p["piece"] for p in pieces["tokens"]).strip() == "hello world"  # raw pieces
    assert _post(server, "/detokenize", {"tokens": r["tokens"]}).json() == {
        "content": "hello world"
    }
    assert _post(server, "/detokenize", {"tokens": [10**9]}).status_code == 400
    assert _post(server, "/tokenize", {"content": 5}).status_code == 400


def test_apply_template_is_the_chat_prompt(server):
    prompt = _post(server, "/apply-template", {"messages": MSGS}).json()["prompt"]
    assert prompt == server.prompter.render(MSGS) and "hello there" in prompt
    assert _post(server, "/apply-template", {"messages": []}).status_code == 400


def test_props(server):
    p = httpx.get(server.url + "/props").json()
    assert p["total_slots"] == 2 and p["default_generation_settings"]["n_ctx"] == 256
    assert p["model_path"].endswith("s35.gguf") and p["chat_template"] == server.prompter.template
    assert "build_info" in p


def test_native_completion_streamed_and_not(server):
    body = {"prompt": "the cat", "n_predict": 8, "temperature": 0, "ignore_eos": True}
    r = _post(server, "/completion", body).json()
    assert r["stop"] is True and r["tokens_predicted"] == 8 and r["stop_type"] == "limit"
    assert r["tokens_evaluated"] == len(server.prompter.text("the cat"))
    assert r["timings"]["predicted_n"] == 8 and r["content"]
    chunks = []
    with httpx.stream("POST", server.url + "/completion", json={**body, "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                chunks.append(json.loads(line[6:]))
    assert chunks[-1]["stop"] is True and chunks[-1]["tokens_predicted"] == 8
    assert "".join(c["content"] for c in chunks) == r["content"]
    assert _post(server, "/completion", {**body, "n_predict": 0}).status_code == 400
    assert "'bogus'" in _post(server, "/completion", {**body, "bogus": 1}).text


def test_embeddings_with_both_encodings(server, model_path):
    oai = sdk_clients(server.url)[0]
    r = oai.embeddings.create(model="tiny", input=["hello", "a different sentence"])
    a, b = (d.embedding for d in r.data)
    n_embd = server.engine.model.config.n_embd
    assert len(a) == n_embd and [d.index for d in r.data] == [0, 1]
    assert sum(x * x for x in a) == pytest.approx(1.0, abs=1e-4)  # L2-normalised
    assert a != b and r.usage.prompt_tokens > 0
    floats = oai.embeddings.create(model="tiny", input="hello", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(a, abs=1e-6)  # the client sent base64 above
    ids = server.prompter.tok.encode("hello", add_special=True, parse_special=False)
    assert oai.embeddings.create(model="tiny", input=ids).data[0].embedding == pytest.approx(a)
    assert embed(server.engine.lm, [ids])[0] == pytest.approx(a, abs=1e-5)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        oai.embeddings.create(model="tiny", input="x", dimensions=3)
    with pytest.raises(openai.BadRequestError, match="input"):
        oai.embeddings.create(model="tiny", input="")


def test_embedding_poolings_differ_and_are_normalised(server):
    ids = server.prompter.tok.encode("one two three four", add_special=True)
    lm = server.engine.lm
    mean, last, cls = (embed(lm, [ids], p)[0] for p in ("mean", "last", "cls"))
    assert mean != last and last != cls
    for v in (mean, last, cls):
        assert sum(x * x for x in v) == pytest.approx(1.0, abs=1e-4)
    # cls is the first token's state: the same for any continuation
    assert embed(lm, [ids[:1] + [5, 6]], "cls")[0] == pytest.approx(cls, abs=1e-5)
    raw = embed(lm, [ids], "mean", normalize=False)[0]
    assert sum(x * x for x in raw) != pytest.approx(1.0)


def test_count_tokens_with_the_anthropic_client(server):
    ant = sdk_clients(server.url)[1]
    n = ant.messages.count_tokens(model="tiny", messages=MSGS, system="be brief")
    msgs = [{"role": "system", "content": "be brief"}, *MSGS]
    assert n.input_tokens == len(server.prompter.chat(msgs))


def test_cors_preflight_and_header(server):
    h = {
        "Origin": "http://example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization",
    }
    r = httpx.options(server.url + "/v1/chat/completions", headers=h)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", h["Origin"])
    r = httpx.get(server.url + "/health", headers={"Origin": "http://example.com"})
    assert r.headers["access-control-allow-origin"] == "*"


def test_chat_page_wiring(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert 'const ENDPOINT = "/v1/chat/completions"' in html
    assert "new AbortController()" in html and "signal: controller.signal" in html
    assert 'stop.addEventListener("click", () => { if (controller) controller.abort(); })' in html
    assert "stream: true" in html and "getReader()" in html and 'id="stop"' in html
    assert "<script src" not in html and "<link" not in html  # self-contained


def test_chat_page_in_a_browser(server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    pw = sync_api.sync_playwright().start()
    try:
        browser = pw.chromium.launch()
    except Exception as e:  # no downloadable browser here (playwright install chromium failed)
        pw.stop()  # its event loop must not outlive the test
        pytest.skip(f"no headless Chromium available: {str(e).splitlines()[0]}")
    try:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.fill("#input", "hello")
        page.click("#send")
        page.wait_for_function("document.querySelector('.assistant').textContent.length > 0")
        page.wait_for_function("!document.getElementById('send').disabled", timeout=60000)
        assert page.text_content(".assistant")
    finally:
        browser.close()
        pw.stop()


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/tmp"
    )


def test_llm_serve_without_fastapi_says_what_to_install():
    code = (
        "import sys; sys.modules['fastapi'] = None; sys.argv = ['llm', 'serve']\n"
        "from llmkit.cli.app import main; main()"
    )
    p = _run(code)
    assert p.returncode == 1
    assert p.stderr == "error: llm serve needs the server extras: pip install 'llmkit[serve]'\n"


def test_serving_without_metrics_needs_no_prometheus(model_path):
    code = f"""
import sys; sys.modules['prometheus_client'] = None
sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
import httpx
from serve_util import live_server, wait_idle
from llmkit.core.serve.server import HttpOptions
with live_server({str(model_path)!r}, http=HttpOptions(port=0), n_ctx=64) as s:
    body = {{"prompt": "x", "max_tokens": 2}}
    assert httpx.post(s.url + "/v1/completions", json=body).status_code == 200
    wait_idle(s)
    assert s.engine.metrics.requests_completed.value == 1
    assert httpx.get(s.url + "/metrics").status_code == 501
print("ok")
"""
    p = _run(code)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]
