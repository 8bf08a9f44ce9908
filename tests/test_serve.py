"""The OpenAI-compatible server (`python -m llada_jax.serve`) on the embedded model, in its own
process: continuous batching gives each
request `llm.generate`'s answer, a short request overtakes a long one, bad requests get 4xx
JSON errors, a disconnecting client frees its slot, the `openai` client works unchanged, and
SIGTERM lets in-flight requests finish."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

import llada_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One pytest-xdist worker runs this module (`--dist loadgroup`): one server start, not two.
pytestmark = pytest.mark.xdist_group("serve")
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def push(self, x):",
           "for i in range(10):", "def add(a, b):\n    return", "x = [1, 2, 3]\n",
           "# sort a list\n", "while True:"]
CHATS = [[{"role": "user", "content": "def square(x):"}],
         [{"role": "system", "content": "You write Python."},
          {"role": "user", "content": "def cube(x):"}]]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def llm():
  # float32: the answers are compared token for token with one-prompt `generate` runs, and XLA's
  # arithmetic depends on the batch around a row; in bfloat16 that flips near-ties now and then
  # (the module doc of llada_jax.serve.engine), in float32 it did not on these prompts.
  return llada_jax.LLM(dtype="float32")


def _start_server(*flags):
  """`python -m llada_jax.serve FLAGS` on a free port; returns (process, base url) once
  /health answers."""
  import tempfile
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  port = _free_port()
  log = tempfile.TemporaryFile("w+")  # not a pipe: a full pipe would block the server
  proc = subprocess.Popen([sys.executable, "-m", "llada_jax.serve", "--port", str(port), *flags],
                          env=env, stderr=log, text=True)
  url = f"http://127.0.0.1:{port}"
  for _ in range(1200):
    try:
      if httpx.get(url + "/health").status_code == 200:
        return proc, url
    except httpx.TransportError:
      if proc.poll() is not None:
        log.seek(0)
        raise AssertionError(log.read()[-3000:]) from None
      time.sleep(0.1)
  proc.kill()
  raise AssertionError("the server did not start")


@pytest.fixture(scope="module")
def server():
  """The server command in its own process (uvicorn, its event loop and the engine's thread stay
  out of the test process): float32, 4 slots, rows of 256 positions, reports every 4
  iterations, 32 tokens by default."""
  proc, url = _start_server("--dtype", "float32", "--slots", "4", "--max-length", "256",
                            "--chunk", "4", "--max-tokens", "32", "--model-name",
                            "llada-default")
  yield url
  proc.terminate()
  proc.wait(timeout=60)


def _stats(url) -> dict:
  return httpx.get(url + "/health").json()


def _sse(lines) -> list[dict]:
  events = []
  for line in lines:
    if line.startswith("data: "):
      data = line[len("data: "):]
      events.append("[DONE]" if data == "[DONE]" else json.loads(data))
  return events


def _complete(url, prompt, max_tokens):
  r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens},
                 timeout=300)
  assert r.status_code == 200, r.text
  return r.json()


def _stream_chat(url, messages, max_tokens, mode="quality"):
  with httpx.stream("POST", url + "/v1/chat/completions", timeout=300, json={
      "messages": messages, "max_tokens": max_tokens, "stream": True, "mode": mode}) as r:
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = _sse(r.iter_lines())
  assert events[-1] == "[DONE]"
  assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
  text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1])
  return text, events


def test_concurrent_requests_equal_generate(server, llm):
  """16 requests at once on 4 slots (completions and streamed chat, 32 or 64 tokens, quality
  and speedy): each answer is `llm.generate` of the same prompt and settings."""
  url = server
  jobs = []
  for i in range(16):
    max_tokens = (32, 64)[i % 2]
    if i % 4 == 3:
      jobs.append(("chat", CHATS[i // 4 % 2], max_tokens, ("quality", "speedy")[i // 8]))
    else:
      jobs.append(("completion", PROMPTS[i % len(PROMPTS)], max_tokens, "quality"))
  before = _stats(url)

  def run(job):
    kind, prompt, max_tokens, mode = job
    if kind == "chat":
      return _stream_chat(url, prompt, max_tokens, mode)
    return _complete(url, prompt, max_tokens)

  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    answers = list(pool.map(run, jobs))
  for job, answer in zip(jobs, answers):
    kind, prompt, max_tokens, mode = job
    if kind == "chat":
      ref = llm.chat(prompt, mode=mode, gen_length=max_tokens)[0]
      text, events = answer
      assert text == ref.text, job
      stats = events[-2]["llada"]
      assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
      assert len(events) > 3  # the role, at least one text delta, the finish
    else:
      ref = llm.generate(prompt, mode=mode, gen_length=max_tokens)[0]
      assert answer["choices"][0]["text"] == ref.text, job
      assert answer["usage"]["completion_tokens"] == len(ref.token_ids)
      assert answer["usage"]["prompt_tokens"] == len(ref.prompt_token_ids)
      stats = answer["llada"]
    assert stats["nfe"] == ref.nfe and stats["edits"] == ref.edits, job
  after = _stats(url)
  assert after["finished"] - before.get("finished", 0) == 16
  # continuous batching: more requests ran than there are slots, with no batch barrier
  assert after["admitted"] - before.get("admitted", 0) == 16


def test_short_request_overtakes_long_one(server):
  """A long request is decoding (its first block streamed) when a short one arrives: the short
  one's whole answer comes back while the long stream is still open."""
  url = server
  t0 = time.monotonic()
  with httpx.stream("POST", url + "/v1/completions", timeout=300, json={
      "prompt": "x = [1, 2, 3]\n", "max_tokens": 192, "stream": True}) as r:
    lines = r.iter_lines()
    first = next(line for line in lines if line.startswith("data: "))
    short = _complete(url, "def fibonacci(n):", 32)
    short_done = time.monotonic() - t0  # since the long request was sent
    rest = _sse([first, *lines])
  assert short["choices"][0]["finish_reason"] in ("stop", "length")
  assert rest[-2]["llada"]["finish"] == "length"  # it ran the whole 192 tokens
  assert short_done < rest[-2]["llada"]["seconds"]  # the short one ended first


@pytest.mark.parametrize("body, status, param, words", [
    ("{not json", 400, None, "not valid JSON"),
    ({"prompt": "x", "max_tokens": 32, "threshold": 70}, 400, "threshold", "percentage"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "gen_length must be a positive"),
    ({"prompt": "x", "max_tokens": 256}, 400, None, "context too long"),
    ({"prompt": "x", "block_length": 16}, 400, "block_length", "fixed by this server"),
    ({"prompt": "x", "temperature": 0.8}, 400, "temperature", "fixed by this server"),
    ({"prompt": "x", "bogus": 1}, 400, "bogus", "unknown field"),
    ({"prompt": "x", "n": 2}, 400, "n", "n must be 1"),
    ({"prompt": "x", "logprobs": 5}, 400, "logprobs", "not supported"),
    ({"prompt": ""}, 400, "prompt", "non-empty"),
    ({"prompt": [1, 99999]}, 400, None, "outside the vocabulary"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
    ({"prompt": "x", "mode": "fast"}, 400, "mode", "unknown mode"),
])
def test_bad_requests_get_openai_errors(server, body, status, param, words):
  url = server
  content = body if isinstance(body, str) else json.dumps(body)
  r = httpx.post(url + "/v1/completions", content=content, timeout=60,
                 headers={"content-type": "application/json"})
  assert r.status_code == status, r.text
  err = r.json()["error"]
  assert words in err["message"] and err["param"] == param and err["type"]
  if "context too long" in words:
    assert err["code"] == "context_length_exceeded"


def test_bad_routes_and_chat_messages(server):
  url = server
  r = httpx.get(url + "/v1/nope")
  assert r.status_code == 404 and "no route" in r.json()["error"]["message"]
  r = httpx.get(url + "/v1/completions")
  assert r.status_code == 405 and r.json()["error"]
  r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user"}]})
  assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
  models = httpx.get(url + "/v1/models").json()
  assert models["data"][0]["id"] == "llada-default"


def test_disconnect_mid_stream_frees_the_slot(server, llm):
  """A client that reads one event and leaves: its row is cancelled at the next report, and a
  request running beside it is not disturbed."""
  url = server
  before = _stats(url).get("cancelled", 0)
  other = concurrent.futures.ThreadPoolExecutor(1).submit(_complete, url, PROMPTS[0], 64)
  with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
      "prompt": PROMPTS[1], "max_tokens": 192, "stream": True}) as r:
    for line in r.iter_lines():
      if line.startswith("data: "):
        break  # leave after the first event
  assert other.result()["choices"][0]["text"] == llm.generate(PROMPTS[0], gen_length=64)[0].text
  for _ in range(200):
    health = _stats(url)
    if health.get("cancelled", 0) > before and health["busy_slots"] == 0:
      break
    time.sleep(0.05)
  assert health.get("cancelled", 0) == before + 1
  assert health["busy_slots"] == 0 and health["queued"] == 0


def test_openai_client(server, llm):
  """The official client, unchanged: completions, chat, streamed chat (our settings through
  `extra_body`)."""
  import openai
  url = server
  client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
  out = client.completions.create(model="llada-default", prompt=PROMPTS[0], max_tokens=32)
  assert out.choices[0].text == llm.generate(PROMPTS[0], gen_length=32)[0].text
  chat = client.chat.completions.create(model="llada-default", messages=CHATS[1],
                                        max_tokens=32, extra_body={"mode": "speedy"})
  ref = llm.chat(CHATS[1], mode="speedy", gen_length=32)[0]
  assert chat.choices[0].message.content == ref.text
  assert chat.usage.completion_tokens == len(ref.token_ids)
  stream = client.chat.completions.create(model="llada-default", messages=CHATS[0],
                                          max_tokens=32, stream=True)
  text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
  assert text == llm.chat(CHATS[0], gen_length=32)[0].text
  with pytest.raises(openai.BadRequestError, match="fixed by this server"):
    client.completions.create(model="llada-default", prompt="x", max_tokens=8,
                              extra_body={"block_length": 8})


def test_engine_survives_a_failing_request(llm):
  """An exception inside a round (here a client callback) fails the requests of that round with
  finish "error" and the message, and the engine goes on serving."""
  from llada_jax.serve.engine import Request
  engine = llm.engine(slots=2, max_length=128, chunk=4)
  results = {}

  def boom(_):
    raise RuntimeError("client callback failed")

  s = engine.settings
  import dataclasses
  s32 = dataclasses.replace(s, gen_length=32)
  engine.submit(Request(prompt_ids=llm.encode(PROMPTS[0]), settings=s32, on_tokens=boom,
                        on_done=lambda r: results.__setitem__("bad", r)))
  engine.submit(Request(prompt_ids=llm.encode(PROMPTS[1]), settings=s32,
                        on_done=lambda r: results.__setitem__("other", r)))
  while len(results) < 2:
    engine.step()
  assert results["bad"].finish == results["other"].finish == "error"
  assert "client callback failed" in results["bad"].error
  engine.submit(Request(prompt_ids=llm.encode(PROMPTS[2]), settings=s32,
                        on_done=lambda r: results.__setitem__("after", r)))
  while "after" not in results:
    engine.step()
  ref = llm.generate(PROMPTS[2], gen_length=32)[0]
  assert results["after"].output_ids == ref.token_ids and results["after"].nfe == ref.nfe
  assert engine.stats["errors"] == 1


@pytest.mark.slow
def test_serve_command_drains_on_sigterm(tmp_path):
  """`python -m llada_jax.serve`: a bad flag is one line (exit 2); a served streaming request
  in flight when SIGTERM arrives still gets its whole answer, then the process exits 0."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  bad = subprocess.run([sys.executable, "-m", "llada_jax.serve", "--slots", "0"], env=env,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and bad.stderr.strip() == "error: --slots must be >= 1, got 0"
  proc, url = _start_server("--slots", "2", "--max-length", "256", "--max-tokens", "96",
                            "--chunk", "2")
  try:
    with httpx.stream("POST", url + "/v1/completions", timeout=120, json={
        "prompt": "def fibonacci(n):", "stream": True}) as r:
      lines = r.iter_lines()
      first = next(line for line in lines if line.startswith("data: "))
      proc.send_signal(signal.SIGTERM)
      events = _sse([first, *lines])
    assert events[-1] == "[DONE]"
    finish = events[-2]
    assert finish["choices"][0]["finish_reason"] in ("stop", "length")
    assert finish["llada"]["finish"] in ("eos", "length")
    assert proc.wait(timeout=60) == 0
  finally:
    if proc.poll() is None:
      proc.kill()


def _chromium():
  """Headless Debian chromium driven by selenium (chromedriver from the same package)."""
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  options = webdriver.ChromeOptions()
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
    options.add_argument(arg)
  options.binary_location = "/usr/bin/chromium"
  return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def test_playground_in_a_browser(server, llm):
  """The page at /: type a prompt, pick Speedy, press Generate; the canvas fills in (masks
  first, then tokens), and the text and the statistics appear: the text is `llm.generate`'s."""
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import Select, WebDriverWait
  url = server
  browser = _chromium()
  try:
    browser.get(url + "/")
    assert browser.title == "llada_jax playground"
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys("class Stack:")
    Select(browser.find_element(By.ID, "mode")).select_by_visible_text("speedy")
    tokens = browser.find_element(By.ID, "max_tokens")
    tokens.clear()
    tokens.send_keys("64")
    browser.find_element(By.ID, "go").click()
    stats = WebDriverWait(browser, 120).until(
        lambda b: (t := b.find_element(By.ID, "stats").text).startswith("NFE") and t)
    ref = llm.generate("class Stack:", mode="speedy", gen_length=64)[0]
    assert f"NFE {ref.nfe} | TPF {ref.tpf:.2f}" in stats and "tokens/s" in stats
    canvas = browser.find_element(By.ID, "canvas")
    assert canvas.get_attribute("data-text") == ref.text
    assert not canvas.find_elements(By.CSS_SELECTOR, ".mask")  # the final canvas: no mask
    # the steps drawn on the way: masks, then M2T fills (the page counts what it drew)
    assert int(canvas.get_attribute("data-drawn-masks")) > 0
    assert int(canvas.get_attribute("data-drawn-fills")) > 0
    assert browser.find_element(By.ID, "error").text == ""
  finally:
    browser.quit()
