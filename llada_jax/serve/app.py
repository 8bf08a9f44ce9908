"""The OpenAI-compatible HTTP API over a continuous-batching `Engine` (Starlette, served by
uvicorn in `python -m llada_jax.serve`).

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with `"stream": true` as
server-sent events, one event per committed stretch of tokens, then `data: [DONE]`),
`GET /v1/models`, `GET /health`, and `GET /` (the playground page).

Request fields: OpenAI's `model` (optional; must name this model when given), `prompt` (a string
or a list of token ids) or `messages`, `max_tokens` / `max_completion_tokens`, `stream`, `seed`,
`temperature`, `top_p`, `n` (1 only), `stop` (not supported), `user` (ignored); and ours:
`mode` ("quality" / "speedy"), `threshold`, `editing_threshold`, `max_post_steps`,
`num_to_transfer`, `steps`, `eos_early_stop`, `max_iterations`, and `block_length`, `mbe_window`,
`algorithm`, `top_k` (accepted when they equal the server's), and `trace` (with `stream`: extra
events `{"llada_canvas": {"tokens": [...], "mask": [...]}}` with the row's whole generation
region after each report, masks included: what the playground draws). A bad request gets an OpenAI-style
error object (`{"error": {"message", "type", "param", "code"}}`) with status 400 (or 404 for an
unknown model, 503 while shutting down), before anything is queued; a prompt that does not fit
the server's max length is refused (`code: "context_length_exceeded"`), never truncated.
Responses carry OpenAI's `usage` and our statistics under `llada` (nfe, tpf, fills, edits).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from llada_jax.decode.settings import MODES, DecodeSettings
from llada_jax.errors import InputError, one_line
from llada_jax.serve.engine import STATIC_FIELDS, Engine, Request, RowResult

OURS = ("trace", "mode", "threshold", "editing_threshold", "max_post_steps", "num_to_transfer", "steps",
        "eos_early_stop", "max_iterations", "block_length", "mbe_window", "algorithm", "top_k")
OPENAI = ("model", "prompt", "messages", "max_tokens", "max_completion_tokens", "stream",
          "stream_options", "seed", "temperature", "top_p", "n", "stop", "user",
          "frequency_penalty", "presence_penalty", "logprobs", "echo", "suffix", "best_of",
          "logit_bias", "top_logprobs", "response_format", "tools", "tool_choice",
          "parallel_tool_calls", "store", "metadata", "service_tier", "reasoning_effort")
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
               "suffix": (None, ""), "best_of": (None, 1), "logit_bias": (None, {}),
               "tools": (None, []), "frequency_penalty": (None, 0, 0.0),
               "presence_penalty": (None, 0, 0.0), "stop": (None, [], "")}
# OpenAI's finish reasons; "budget" (the iteration budget ran out, masks left) reads as length
FINISH = {"eos": "stop", "length": "length", "budget": "length", "cancelled": "length"}


class _Canvas:
  def __init__(self, ids):
    self.ids = ids


class BadRequest(Exception):
  def __init__(self, message: str, param: str | None = None, code: str | None = None,
               status: int = 400):
    super().__init__(message)
    self.message, self.param, self.code, self.status = message, param, code, status


def error_response(e: BadRequest) -> JSONResponse:
  kind = {400: "invalid_request_error", 404: "not_found_error",
          503: "service_unavailable"}.get(e.status, "invalid_request_error")
  return JSONResponse({"error": {"message": e.message, "type": kind, "param": e.param,
                                 "code": e.code}}, status_code=e.status)


class Server:
  """The app's state: the LLM (tokenizer, chat template), its engine, the served model id."""

  def __init__(self, llm, engine: Engine, *, model_id: str, default_max_tokens: int = 128,
               default_mode: str = "quality"):
    self.llm, self.engine, self.model_id = llm, engine, model_id
    self.default_max_tokens, self.default_mode = default_max_tokens, default_mode
    self.started = time.time()

  # ---- request parsing --------------------------------------------------------------------------
  async def _body(self, request: HTTPRequest) -> dict[str, Any]:
    try:
      body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise BadRequest(f"the request body is not valid JSON ({one_line(e)})") from None
    if not isinstance(body, dict):
      raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - set(OURS) - set(OPENAI))
    if unknown:
      raise BadRequest(f"unknown field(s): {', '.join(unknown)}", param=unknown[0])
    for name, allowed in UNSUPPORTED.items():
      if body.get(name) not in allowed:
        raise BadRequest(f"{name} is not supported by this server", param=name)
    if body.get("n", 1) != 1:
      raise BadRequest("n must be 1", param="n")
    model = body.get("model")
    if model is not None and model != self.model_id:
      raise BadRequest(f"the model {model!r} does not exist; this server serves "
                       f"{self.model_id!r}", param="model", code="model_not_found", status=404)
    return body

  def _settings(self, body: dict[str, Any]) -> DecodeSettings:
    mode = body.get("mode", self.default_mode)
    if mode not in MODES:
      raise BadRequest(f"unknown mode {mode!r}; choose from {', '.join(MODES)}", param="mode")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    over = {k: body[k] for k in OURS if k not in ("mode", "trace") and k in body}
    over["gen_length"] = self.default_max_tokens if max_tokens is None else max_tokens
    for name in ("temperature", "top_p", "seed"):
      if body.get(name) is not None:
        over[name] = body[name]
    for name in STATIC_FIELDS:  # the server's value unless the request names one
      over.setdefault(name, getattr(self.engine.settings, name))
    try:
      return DecodeSettings.for_mode(mode, **over)
    except (InputError, TypeError) as e:
      param = next((k for k in over if k in str(e)), None)
      raise BadRequest(one_line(e), param="max_tokens" if param == "gen_length" else param)

  def _prompt_ids(self, body: dict[str, Any], chat: bool) -> list[int]:
    try:
      if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
          raise BadRequest("messages must be a non-empty list", param="messages")
        for i, m in enumerate(messages):
          if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string 'role' and "
                             "'content'", param="messages")
        return self.llm.encode(self.llm.apply_chat_template(messages))
      prompt = body.get("prompt")
      if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # OpenAI's batch form with one prompt
      if not isinstance(prompt, (str, list)) or not prompt:
        raise BadRequest("prompt must be a non-empty string or list of token ids",
                         param="prompt")
      return self.llm.prompt_ids(prompt)
    except InputError as e:
      raise BadRequest(one_line(e), param="messages" if chat else "prompt") from None

  # ---- endpoints --------------------------------------------------------------------------------
  async def completions(self, request: HTTPRequest):
    return await self._complete(request, chat=False)

  async def chat_completions(self, request: HTTPRequest):
    return await self._complete(request, chat=True)

  async def _complete(self, request: HTTPRequest, chat: bool):
    try:
      body = await self._body(request)
      settings = self._settings(body)
      ids = self._prompt_ids(body, chat)
      try:
        self.engine.check(ids, settings)
      except InputError as e:
        msg = one_line(e)
        code = "context_length_exceeded" if msg.startswith("context too long") else None
        param = next((k for k in STATIC_FIELDS if msg.startswith(k)), None)
        raise BadRequest(msg, param=param, code=code) from None
    except BadRequest as e:
      return error_response(e)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    trace = bool(body.get("trace")) and bool(body.get("stream"))
    req = Request(prompt_ids=ids, settings=settings,
                  on_tokens=lambda new: loop.call_soon_threadsafe(queue.put_nowait, new),
                  on_done=lambda res: loop.call_soon_threadsafe(queue.put_nowait, res),
                  on_canvas=(lambda ids: loop.call_soon_threadsafe(queue.put_nowait,
                                                                   _Canvas(ids)))
                  if trace else None)
    try:
      self.engine.submit(req)
    except InputError as e:
      return error_response(BadRequest(one_line(e), status=503))
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    if body.get("stream"):
      include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
      return StreamingResponse(self._stream(request, req, queue, rid, chat, include_usage),
                               media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
    try:
      while True:
        try:
          item = await asyncio.wait_for(queue.get(), timeout=1.0)
        except asyncio.TimeoutError:
          if await request.is_disconnected():  # the client left: free its slot
            req.cancel()
            return JSONResponse({}, status_code=499)
          continue
        if isinstance(item, RowResult):
          break
    except asyncio.CancelledError:
      req.cancel()
      raise
    if item.finish == "error":
      return JSONResponse({"error": {"message": f"decoding failed: {item.error}",
                                     "type": "server_error", "param": None, "code": None}},
                          status_code=500)
    return JSONResponse(self._response(rid, chat, ids, item))

  def _usage(self, ids, result: RowResult) -> dict[str, int]:
    n = len(result.output_ids)
    return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

  def _stats(self, result: RowResult) -> dict[str, Any]:
    return {"nfe": result.nfe, "tpf": round(result.tpf, 4), "fills": result.fills,
            "edits": result.edits, "finish": result.finish,
            "seconds": round(result.seconds, 4),
            "queued_seconds": round(result.queued_seconds, 4)}

  def _text(self, ids: list[int]) -> str:
    return self.llm.decode(ids)

  def _response(self, rid: str, chat: bool, ids, result: RowResult) -> dict[str, Any]:
    text = self._text(result.output_ids)
    finish = FINISH[result.finish]
    if chat:
      choice = {"index": 0, "message": {"role": "assistant", "content": text},
                "finish_reason": finish, "logprobs": None}
    else:
      choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": self.model_id, "choices": [choice],
            "usage": self._usage(ids, result), "llada": self._stats(result)}

  async def _stream(self, http: HTTPRequest, req: Request, queue: asyncio.Queue, rid: str,
                    chat: bool, include_usage: bool):
    """SSE events: text deltas as blocks commit (the text of all tokens so far, less what was
    sent; a trailing partial UTF-8 character waits for its next token), then the finish."""
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(delta_text: str | None, finish: str | None = None, role: bool = False,
              extra: dict | None = None) -> str:
      if chat:
        delta = {"role": "assistant", "content": ""} if role else (
            {} if delta_text is None else {"content": delta_text})
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
      else:
        choice = {"index": 0, "text": delta_text or "", "finish_reason": finish,
                  "logprobs": None}
      chunk = {"id": rid, "object": obj, "created": created, "model": self.model_id,
               "choices": [choice]}
      if extra:
        chunk.update(extra)
      return f"data: {json.dumps(chunk)}\n\n"

    tokens: list[int] = []
    sent_text = ""
    finished = False
    try:
      if chat:
        yield event(None, role=True)
      while True:
        try:
          item = await asyncio.wait_for(queue.get(), timeout=1.0)
        except asyncio.TimeoutError:
          if await http.is_disconnected():
            return
          continue
        if isinstance(item, _Canvas):
          yield self._canvas_event(rid, obj, created, item.ids, req.settings.mask_id)
          continue
        if isinstance(item, RowResult):
          if item.finish == "error":
            yield "data: " + json.dumps({"error": {
                "message": f"decoding failed: {item.error}", "type": "server_error",
                "param": None, "code": None}}) + "\n\n"
            finished = True
            return
          if req.on_canvas is not None:
            yield self._canvas_event(rid, obj, created, item.output_ids, req.settings.mask_id)
          text = self._text(item.output_ids)
          if len(text) > len(sent_text):
            yield event(text[len(sent_text):])
          yield event(None, finish=FINISH[item.finish], extra={"llada": self._stats(item)})
          if include_usage:  # OpenAI's last chunk: no choices, the usage
            yield ("data: " + json.dumps({
                "id": rid, "object": obj, "created": created, "model": self.model_id,
                "choices": [], "usage": self._usage(req.prompt_ids, item)}) + "\n\n")
          yield "data: [DONE]\n\n"
          finished = True
          return
        tokens.extend(item)
        text = self._text(tokens)
        if text.endswith("\ufffd"):
          continue
        if len(text) > len(sent_text) and text.startswith(sent_text):
          yield event(text[len(sent_text):])
          sent_text = text
    finally:
      if not finished:
        req.cancel()  # the client went away: free the slot at the engine's next report

  def _canvas_event(self, rid, obj, created, ids, mask_id) -> str:
    """The row's generation region as text pieces (None for a mask)."""
    tokens = [None if t == mask_id else self.llm.decode([t]) for t in ids]
    return "data: " + json.dumps({"id": rid, "object": obj, "created": created,
                                  "model": self.model_id, "choices": [],
                                  "llada_canvas": {"tokens": tokens}}) + "\n\n"

  async def models(self, request: HTTPRequest):
    return JSONResponse({"object": "list", "data": [{
        "id": self.model_id, "object": "model", "created": int(self.started),
        "owned_by": "llada_jax", "max_model_len": self.engine.max_length}]})

  async def health(self, request: HTTPRequest):
    e = self.engine
    stats = dict(e.stats)  # the engine thread may add a key meanwhile
    return JSONResponse({"status": "ok", "slots": e.slots,
                         "busy_slots": sum(r is not None for r in list(e._rows)),
                         "queued": len(e._queue), "last_error": e.last_error,
                         **{k: int(v) for k, v in stats.items()}})

  async def playground(self, request: HTTPRequest):
    with open(os.path.join(os.path.dirname(__file__), "playground.html"), encoding="utf-8") as f:
      return HTMLResponse(f.read())


def build_app(server: Server, *, drain_seconds: float = 30.0) -> Starlette:
  """The Starlette app; the engine's thread starts with the app and stops with it (in-flight
  requests get up to `drain_seconds` to finish, then are cancelled)."""
  import contextlib

  @contextlib.asynccontextmanager
  async def lifespan(app):
    server.engine.start()
    try:
      yield
    finally:
      await asyncio.get_running_loop().run_in_executor(None, server.engine.stop, drain_seconds)

  async def not_found(request, exc):
    return error_response(BadRequest(f"no route {request.method} {request.url.path}",
                                     status=404))

  async def bad_method(request, exc):
    return error_response(BadRequest(f"method {request.method} is not allowed on "
                                     f"{request.url.path}", status=405))

  return Starlette(routes=[
      Route("/v1/completions", server.completions, methods=["POST"]),
      Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
      Route("/v1/models", server.models, methods=["GET"]),
      Route("/health", server.health, methods=["GET"]),
      Route("/", server.playground, methods=["GET"]),
  ], lifespan=lifespan, exception_handlers={404: not_found, 405: bad_method})
