"""The chat page served at `/`: one self-contained HTML file (no external assets). It streams the
reply from /v1/chat/completions with fetch() and reads the SSE body itself; Stop aborts the fetch
(an AbortController), which hangs up and so cancels the request on the server."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>llmkit chat</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 48rem; margin: 1rem auto; padding: 0 1rem; }
  #log { border: 1px solid #ccc; border-radius: 6px; padding: .5rem; min-height: 12rem;
         white-space: pre-wrap; overflow-y: auto; max-height: 70vh; }
  .user { color: #1a4f8b; margin: .4rem 0; } .assistant { margin: .4rem 0; }
  .error { color: #a00; }
  form { display: flex; gap: .5rem; margin-top: .5rem; }
  #input { flex: 1; min-height: 3rem; }
  #key { width: 10rem; }
</style>
</head>
<body>
<h1>llmkit chat</h1>
<div id="log" aria-live="polite"></div>
<form id="form">
  <textarea id="input" placeholder="Message (Enter sends, Shift+Enter: new line)"></textarea>
  <button id="send" type="submit">Send</button>
  <button id="stop" type="button" disabled>Stop</button>
</form>
<p><input id="key" type="password" placeholder="API key (if any)">
   <button id="clear" type="button">New chat</button></p>
<script>
"use strict";
const ENDPOINT = "/v1/chat/completions";
const log = document.getElementById("log"), input = document.getElementById("input");
const send = document.getElementById("send"), stop = document.getElementById("stop");
const key = document.getElementById("key");
let messages = [], controller = null;

function line(cls, text) {
  const div = document.createElement("div");
  div.className = cls; div.textContent = text; log.appendChild(div);
  log.scrollTop = log.scrollHeight; return div;
}

async function ask(text) {
  messages.push({role: "user", content: text});
  line("user", "You: " + text);
  const out = line("assistant", "");
  controller = new AbortController();
  send.disabled = true; stop.disabled = false;
  let reply = "";
  try {
    const headers = {"Content-Type": "application/json"};
    if (key.value) headers["Authorization"] = "Bearer " + key.value;
    const r = await fetch(ENDPOINT, {
      method: "POST", headers, signal: controller.signal,
      body: JSON.stringify({messages, stream: true}),
    });
    if (!r.ok) {
      const j = await r.json().catch(() => ({}));
      throw new Error((j.error && j.error.message) || ("HTTP " + r.status));
    }
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let at;
      while ((at = buf.indexOf("\\n\\n")) >= 0) {  // one SSE event
        const ev = buf.slice(0, at); buf = buf.slice(at + 2);
        for (const l of ev.split("\\n")) {
          if (!l.startsWith("data: ")) continue;
          const data = l.slice(6);
          if (data === "[DONE]") continue;
          const j = JSON.parse(data);
          if (j.error) throw new Error(j.error.message);
          const d = j.choices && j.choices[0] && j.choices[0].delta;
          if (d && d.content) { reply += d.content; out.textContent = reply; }
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") line("error", "(stopped)");
    else line("error", "Error: " + e.message);
  } finally {
    if (reply) messages.push({role: "assistant", content: reply});
    controller = null; send.disabled = false; stop.disabled = true;
  }
}

stop.addEventListener("click", () => { if (controller) controller.abort(); });
document.getElementById("clear").addEventListener("click", () => {
  messages = []; log.textContent = "";
});
document.getElementById("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if (text && !controller) { input.value = ""; ask(text); }
});
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault(); document.getElementById("form").requestSubmit();
  }
});
</script>
</body>
</html>
"""
