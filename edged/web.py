"""The HTTP front door: the Ollama and OpenAI chat APIs and the kiosk page, served by aiohttp on a thread of
its own. Requests go through the same admission and queue as MQTT ones (``inbox.admit``); the worker's
replies come back through a per-request sink that hands them to the server's event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from edged import ollama_api, openai_api, protocol
from edged.chat import Answer, Ask, ServedModel, parameter_size, to_request
from edged.config import HttpConfig
from edged.errors import EdgedError, InvalidRequest, TooLong
from edged.inbox import Wiring, admit
from edged.llm import Engine
from edged.llm.engine import Sequence
from edged.metrics import Counts
from edged.profiles import Catalog
from edged.protocol import Identity, Request
from edged.store import read_manifest

log = logging.getLogger(__name__)

KIOSK_DIR = Path(__file__).parent / "kiosk"  # index.html and the mqtt.js it loads (MIT, vendored)
MAX_BODY_BYTES = 1 << 20  # a long conversation with tool schemas; the context budget decides the rest
_SHUTDOWN_S = 3.0
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _BodyTooLarge(TooLong):
    """HTTP 413."""


@dataclass(frozen=True)
class Served:
    """What the front door reads from the rest of the node, at each request (a reload may change it)."""

    wiring: Callable[[], Wiring]
    engine: Callable[[], Engine | None]


def describe(engine: Engine | None, profiles: Catalog) -> ServedModel | None:
    """The loaded model as the APIs describe it, from its directory (manifest, config, tokenizer config)."""
    if engine is None:
        return None
    manifest_path = engine.model_dir / "manifest.json"
    manifest = read_manifest(engine.model_dir)
    config = _json(engine.model_dir / "config.json")
    return ServedModel(
        name=engine.name,
        size_bytes=sum(int(f.get("bytes", 0)) for f in manifest["files"].values()),
        digest=hashlib.sha256(manifest_path.read_bytes()).hexdigest(),
        modified_at=manifest_path.stat().st_mtime,
        quant=str(manifest.get("quant") or ""),
        family=str(config.get("model_type") or ""),
        parameter_size=parameter_size(engine.name),
        context_tokens=engine.context_tokens,
        chat_template=str(_json(engine.model_dir / "tokenizer_config.json").get("chat_template") or ""),
        profiles=profiles,
    )


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


class _Sink:
    """One HTTP request's replies (scheduler.Replies), called on the worker thread and handed to the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, counters: Counts, model: str) -> None:
        self._loop = loop
        self._counters = counters
        self._model = model
        self.events: asyncio.Queue[str | Answer | EdgedError] = asyncio.Queue()

    def _put(self, event: str | Answer | EdgedError) -> None:
        with contextlib.suppress(RuntimeError):  # the server's loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)

    def chunk(self, request: Request, seq: int, delta: str) -> None:
        self._put(delta)

    def result(self, request: Request, generation: Sequence, energy_j: float | None, model: str) -> None:
        r = generation.result
        assert r is not None
        self._counters.add("answered")
        log.info(
            "answered %s over HTTP: %s, %d tokens, %.0f ms",
            request.id,
            r.finish_reason,
            r.usage.completion_tokens,
            r.timings.total_ms,
            extra={"request_id": request.id},
        )
        self._put(Answer.of(r, model))

    def ended(self, request: Request, finish_reason: str) -> None:
        self._counters.add("answered")
        self._put(Answer.unfinished(finish_reason, self._model, (time.time() - request.received_at) * 1000))

    def failed(self, request: Request, exc: EdgedError) -> None:
        self._counters.add(f"error.{exc.code}")
        self._put(exc)


class _Ticket:
    """A queued HTTP request: its events, and a cancel for when its client goes away."""

    def __init__(self, request: Request, sink: _Sink, cancel: Callable[[], None]) -> None:
        self.request = request
        self._sink = sink
        self._cancel = cancel
        self.finished = False

    async def events(self) -> AsyncIterator[str | Answer]:
        """Text deltas (streamed requests), then one Answer; a failure is raised."""
        while True:
            event = await self._sink.events.get()
            if isinstance(event, EdgedError):
                self.finished = True
                raise event
            if isinstance(event, Answer):
                self.finished = True
            yield event
            if self.finished:
                return

    async def answer(self) -> Answer:
        async for event in self.events():
            if isinstance(event, Answer):
                return event
        raise AssertionError("the event stream ended without an answer")

    def cancel(self) -> None:
        if not self.finished:
            self._cancel()


class FrontDoor:
    """aiohttp on its own thread and event loop; ``start`` binds (OSError when the address is taken)."""

    def __init__(self, config: HttpConfig, served: Served, counters: Counts) -> None:
        self._config = config
        self._served = served
        self._counters = counters
        self._key = config.api_key.encode()
        self._tickets: set[_Ticket] = set()
        self._described: tuple[Engine | None, Catalog, ServedModel | None] | None = None
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._run, name="edged-http", daemon=True)
        self._opened: concurrent.futures.Future[None] = concurrent.futures.Future()

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> None:
        self._thread.start()
        try:
            self._opened.result(timeout_s)
        except OSError as exc:
            raise OSError(f"the HTTP front door cannot listen on {self._config.listen}: {exc.strerror}") from exc
        log.info("HTTP front door on %s (Ollama and OpenAI APIs, /kiosk)", self._config.listen)

    def stop(self) -> None:
        """Stops taking requests; the ones it holds are cancelled and answered, then the server closes."""
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(_SHUTDOWN_S + 5)
        except (concurrent.futures.TimeoutError, RuntimeError) as exc:
            log.warning("the HTTP front door did not close cleanly: %r", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._open())
        except BaseException as exc:  # handed to start(), which raises it on the caller's thread
            self._opened.set_exception(exc)
            return
        self._opened.set_result(None)
        self._loop.run_forever()
        self._loop.close()

    async def _open(self) -> None:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/", self._root)
        app.router.add_get("/kiosk", self._kiosk_redirect)
        app.router.add_get("/kiosk/", self._kiosk)
        app.router.add_get("/kiosk/mqtt.min.js", self._kiosk_script)
        app.router.add_get("/api/version", self._version)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_get("/api/ps", self._ps)
        app.router.add_post("/api/show", self._show)
        app.router.add_post("/api/chat", self._ollama_chat)
        app.router.add_post("/api/generate", self._ollama_generate)
        app.router.add_get("/v1/models", self._openai_models)
        app.router.add_get("/v1/models/{model}", self._openai_model)
        app.router.add_post("/v1/chat/completions", self._openai_chat)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=_SHUTDOWN_S)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._config.host, self._config.port).start()

    async def _close(self) -> None:
        for ticket in list(self._tickets):
            ticket.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- every request ---------------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """The bearer token (when configured), and every refusal as the API's own error with its status."""
        openai = request.path.startswith("/v1/")
        if self._key and not request.path.startswith("/kiosk"):
            supplied = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(supplied, b"Bearer " + self._key):
                self._counters.add("http_unauthorized")
                message = "a valid API key is required: send the header Authorization: Bearer <key>"
                return self._error(openai, 401, message, "unauthorized", None)
        try:
            return await handler(request)
        except EdgedError as exc:
            self._counters.add(f"error.{exc.code}")
            if isinstance(exc, InvalidRequest):
                self._counters.add("invalid")
            log.info("HTTP %s %s refused: %s: %s", request.method, request.path, exc.code, exc.message)
            status = 413 if isinstance(exc, _BodyTooLarge) else (openai_api if openai else ollama_api).status_of(exc)
            return self._error(openai, status, exc.message, exc.code, exc.retry_after_s)

    def _error(self, openai: bool, status: int, message: str, code: str, retry_after_s: float | None) -> web.Response:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        if retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
        if openai:
            body = openai_api.error(message, code, retry_after_s, status)
        else:
            body = ollama_api.error(message, code, retry_after_s)
        return web.json_response(body, status=status, headers=headers)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise _BodyTooLarge(f"the request body is {request.content_length} bytes; at most {MAX_BODY_BYTES}")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _BodyTooLarge(f"the request body is over {MAX_BODY_BYTES} bytes") from None
        body = protocol.load_json(raw)
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        return body

    def _model(self) -> ServedModel | None:
        """The served model's description, read again only when a reload swapped the engine."""
        engine, profiles = self._served.engine(), self._served.wiring().defaults.profiles
        if self._described is None or self._described[:2] != (engine, profiles):
            self._described = (engine, profiles, describe(engine, profiles))
        return self._described[2]

    async def _submit(self, ask: Ask, request: web.Request, model: str) -> _Ticket:
        """Admits and queues ``ask`` as MQTT requests are (rate, model, governor, queue, the format compiled,
        the context budget)."""
        self._counters.add("received")
        self._counters.add("http_received")
        wiring = self._served.wiring()
        identity = Identity(f"http:{request.remote or 'unknown'}", True)
        queued = to_request(ask, protocol.new_id(), identity, wiring.defaults, time.time())
        queued, prompt_ids = admit(wiring, queued)  # the format or tool-call constraint compiled here too
        scheduler = wiring.scheduler
        assert scheduler is not None
        sink = _Sink(asyncio.get_running_loop(), self._counters, model)

        def cancel() -> None:
            scheduler.cancel(identity, queued.id)

        ticket = _Ticket(queued, sink, cancel)
        scheduler.submit(queued, prompt_ids, replies=sink)
        self._tickets.add(ticket)
        return ticket

    async def _stream(
        self, request: web.Request, ticket: _Ticket, content_type: str, lines: AsyncIterator[bytes]
    ) -> web.StreamResponse:
        """Writes ``lines`` as they come; a client that goes away cancels its request."""
        response = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            async for line in lines:
                await response.write(line)
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            log.info("HTTP client went away; request %s cancelled", ticket.request.id)
            raise
        finally:
            ticket.cancel()
            self._tickets.discard(ticket)
        return response

    async def _wait(self, request: web.Request, ticket: _Ticket) -> Answer:
        """The final answer of a request that is not streamed; a client that goes away cancels it."""
        try:
            waiting = asyncio.ensure_future(ticket.answer())
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=0.5)
                if done:
                    return waiting.result()
                if request.transport is None or request.transport.is_closing():
                    log.info("HTTP client went away; request %s cancelled", ticket.request.id)
                    ticket.cancel()
        finally:
            ticket.cancel()
            self._tickets.discard(ticket)

    # -- the kiosk page --------------------------------------------------------------------------------

    async def _kiosk_redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/kiosk/")  # so the page's relative mqtt.min.js resolves under /kiosk/

    async def _kiosk(self, request: web.Request) -> web.Response:
        defaults = self._served.wiring().defaults
        html = (KIOSK_DIR / "index.html").read_text()
        return web.Response(
            text=kiosk_page(html, defaults.node, defaults.prefix, self._config.kiosk_broker), content_type="text/html"
        )

    async def _kiosk_script(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(KIOSK_DIR / "mqtt.min.js", headers={"Content-Type": "text/javascript"})

    # -- the Ollama API --------------------------------------------------------------------------------

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="edged is running")

    async def _version(self, request: web.Request) -> web.Response:
        import edged

        return web.json_response({"version": edged.__version__})

    async def _tags(self, request: web.Request) -> web.Response:
        return web.json_response(ollama_api.tags(self._model()))

    async def _ps(self, request: web.Request) -> web.Response:
        return web.json_response(ollama_api.ps(self._model()))

    async def _show(self, request: web.Request) -> web.Response:
        return web.json_response(ollama_api.show(await self._body(request), self._model()))

    async def _ollama_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._ollama(request, chat=True)

    async def _ollama_generate(self, request: web.Request) -> web.StreamResponse:
        return await self._ollama(request, chat=False)

    async def _ollama(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        body = await self._body(request)
        served = self._model()
        ask = ollama_api.parse_chat(body, served) if chat else ollama_api.parse_generate(body, served)
        name = str(body["model"])
        if ask is None:
            return web.json_response(ollama_api.loaded(name, time.time(), chat=chat))
        assert served is not None
        ticket = await self._submit(ask, request, served.name)
        chunk = ollama_api.chat_chunk if chat else ollama_api.generate_chunk
        final = ollama_api.chat_final if chat else ollama_api.generate_final
        if not ask.stream:
            answer = ask.settle(await self._wait(request, ticket))
            return web.json_response(final(name, answer, time.time(), streamed=False))

        async def lines() -> AsyncIterator[bytes]:
            try:
                async for event in ticket.events():
                    if isinstance(event, Answer):  # the whole reply here when it was not streamed (a tool call)
                        yield _ndjson(final(name, ask.settle(event), time.time(), streamed=ask.streams_text))
                    else:
                        yield _ndjson(chunk(name, event, time.time()))
            except EdgedError as exc:  # after the stream began: the client raises it from this line
                yield _ndjson(ollama_api.error(exc.message, exc.code, exc.retry_after_s))

        return await self._stream(request, ticket, "application/x-ndjson", lines())

    # -- the OpenAI API --------------------------------------------------------------------------------

    async def _openai_models(self, request: web.Request) -> web.Response:
        return web.json_response(openai_api.models(self._model()))

    async def _openai_model(self, request: web.Request) -> web.Response:
        return web.json_response(openai_api.model(request.match_info["model"], self._model()))

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        served = self._model()
        ask = openai_api.parse(body, served)
        assert served is not None
        name, created = str(body["model"]), int(time.time())
        ticket = await self._submit(ask, request, served.name)
        completion_id = f"chatcmpl-{ticket.request.id}"
        if not ask.stream:
            answer = ask.settle(await self._wait(request, ticket))
            return web.json_response(openai_api.completion(completion_id, name, created, answer))
        with_usage = openai_api.include_usage(body)

        async def events() -> AsyncIterator[bytes]:
            yield _sse(openai_api.first_chunk(completion_id, name, created))
            try:
                async for event in ticket.events():
                    if isinstance(event, Answer):
                        answer = ask.settle(event)
                        if not ask.streams_text:  # read whole: a tool call, or the answer beside one
                            yield _sse(openai_api.whole_chunk(completion_id, name, created, answer))
                        yield _sse(openai_api.last_chunk(completion_id, name, created, answer))
                        if with_usage:
                            yield _sse(openai_api.usage_chunk(completion_id, name, created, answer))
                    else:
                        yield _sse(openai_api.chunk(completion_id, name, created, event))
            except EdgedError as exc:  # after the stream began: the client raises APIError from this event
                status = openai_api.status_of(exc)
                yield _sse(openai_api.error(exc.message, exc.code, exc.retry_after_s, status))
            yield b"data: [DONE]\n\n"

        return await self._stream(request, ticket, "text/event-stream", events())


def kiosk_page(html: str, node: str, prefix: str, broker: str) -> str:
    """The kiosk page with this node's settings in it (a query string still overrides them)."""
    settings = {"node": node, "prefix": prefix, **({"broker": broker} if broker else {})}
    block = json.dumps(settings).replace("</", "<\\/")
    placeholder = '<script id="edged-settings" type="application/json">{}</script>'
    return html.replace(placeholder, f'<script id="edged-settings" type="application/json">{block}</script>')


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _ndjson(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
