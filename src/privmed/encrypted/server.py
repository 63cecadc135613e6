"""``privmed serve``: the model owner's FastAPI server. It sees ciphertexts and public
evaluation keys only; it returns encrypted scores.

Endpoints (OpenAPI at ``/docs`` and ``/openapi.json``):
``GET /v1/health``, ``GET /v1/model`` (public model card, ``card.py``),
``POST /v1/sessions`` (upload an evaluation context; returns a session id and a bearer
token), ``POST /v1/sessions/{id}/predict?encoding=single|batch`` and
``DELETE /v1/sessions/{id}`` (both with ``Authorization: Bearer TOKEN``). Payloads are
``application/octet-stream`` messages (``wire.py``), spooled to disk under a global byte
budget (``bodies.py``); sessions and their limits are in ``sessions.py``. The log
carries counts and timings, never payload bytes, session ids or tokens.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from privmed import processes
from privmed.encrypted.bodies import OCTET, ByteBudget, require_octet_stream, spooled_body
from privmed.encrypted.card import public_card
from privmed.encrypted.compiler import HEModel
from privmed.encrypted.evaluate import EvaluationError, EvaluationKeys, Evaluator
from privmed.encrypted.sessions import Session, SessionStore
from privmed.encrypted.wire import WireError, pack, read_header, read_part
from privmed.errors import ConfigError

log = logging.getLogger("privmed.serve")
DEFAULT_PORT = 8765
CONTEXT_PARTS = {"relin_keys", "galois_keys"}
SECRET_PARTS = {"secret_key", "secret"}


@dataclass
class ServerLimits:
    session_ttl_s: float = 1800.0
    max_sessions: int = 16
    max_context_bytes: int = 64 << 20
    max_request_bytes: int = 384 << 20
    # images the server computes per session token: 4096 per batch request, whatever the
    # client says it packed (bounds model extraction, docs/threat-model.md)
    max_images_per_session: int = 100_000
    max_inflight_bytes: int = 512 << 20  # request bodies held at once, all requests together
    body_timeout_s: float = 600.0  # a reserved budget cannot be held by a stalled upload
    max_connections: int = 64  # uvicorn's limit_concurrency: HTTP 503 beyond it


def _context_keys(body: BinaryIO, size: int) -> dict[str, bytes]:
    _, refs = read_header(body, size, "context")
    names = [r.name for r in refs]
    if SECRET_PARTS & set(names):
        raise HTTPException(400, "This context contains a secret key: send only the public "
                                 "evaluation keys (the server must never hold your secret "
                                 "key).")
    if set(names) - CONTEXT_PARTS or len(set(names)) != len(names) or "relin_keys" not in names:
        raise HTTPException(400, "An evaluation context holds relin_keys and optionally "
                                 f"galois_keys, once each; got {sorted(names)[:8]}.")
    return {r.name: read_part(body, r) for r in refs}


def create_app(model: HEModel, limits: ServerLimits | None = None) -> FastAPI:
    limits = limits or ServerLimits()
    evaluator = Evaluator(model)
    store = SessionStore(limits.session_ttl_s, limits.max_sessions,
                         limits.max_images_per_session)
    budget = ByteBudget(limits.max_inflight_bytes)
    compute_lock = threading.Lock()  # SEAL holds the GIL: one evaluation at a time
    card = public_card(model, limits)
    bearer = HTTPBearer(auto_error=False, description="The token returned with the session.")
    app = FastAPI(title="privmed encrypted inference",
                  description="CKKS inference: the server computes on ciphertexts and never "
                              "sees images or secret keys.", version="1")
    app.state.store = store
    app.state.budget = budget

    @app.exception_handler(WireError)
    @app.exception_handler(EvaluationError)
    async def _bad_input(_: Request, exc: Exception) -> Response:
        log.info("rejected a request: %s", exc)
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(_: Request, exc: RequestValidationError) -> Response:
        # FastAPI's default detail is a list of errors; this API answers one sentence
        err = (exc.errors() or [{}])[0]
        where = " ".join(str(x) for x in err.get("loc", ())[1:]) or "request"
        msg = str(err.get("msg", "is invalid")).rstrip(".")
        return JSONResponse({"detail": f"The {where} parameter is invalid: {msg}."},
                            status_code=422)

    # dependencies as default values: Annotated[...] strings cannot name this app's locals
    bearer_token = Depends(bearer)

    def session_of(sid: str, credentials: HTTPAuthorizationCredentials | None = bearer_token
                   ) -> Session:
        return store.authorise(sid, credentials.credentials if credentials else None)

    authorised = Depends(session_of)

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": card.get("model"), "sessions": len(store)}

    @app.get("/v1/model")
    def model_info() -> dict[str, Any]:
        return card

    @app.post("/v1/sessions", status_code=201, dependencies=[Depends(require_octet_stream)])
    async def create_session(request: Request) -> dict[str, Any]:
        with store.opening():
            async with spooled_body(request, limits.max_context_bytes, "evaluation context",
                                    budget, limits.body_timeout_s) as (body, size):
                def load() -> EvaluationKeys:
                    blobs = _context_keys(body, size)
                    return evaluator.load_keys(blobs["relin_keys"], blobs.get("galois_keys"))

                keys = await run_in_threadpool(load)
            sid, token = store.add(keys)
        log.info("session opened (%d bytes of keys, rotations: %s)", size,
                 keys.galois is not None)
        return {"session": sid, "token": token, "expires_in_s": limits.session_ttl_s,
                "max_images": limits.max_images_per_session,
                "encodings": ["single", "batch"] if keys.galois is not None else ["batch"]}

    @app.delete("/v1/sessions/{sid}")
    def close_session(sid: str, session: Session = authorised) -> dict[str, bool]:
        store.remove(sid)
        return {"closed": True}

    @app.post("/v1/sessions/{sid}/predict", dependencies=[Depends(require_octet_stream)])
    async def predict(request: Request, encoding: Literal["single", "batch"] = "single",
                      session: Session = authorised) -> Response:
        g = model.geometry
        cost = 1 if encoding == "single" else model.params.slots  # what is computed

        def run(body: BinaryIO, size: int) -> tuple[list[tuple[str, bytes]], float]:
            _, refs = read_header(body, size, "ciphertexts")
            expected = 1 if encoding == "single" else g.pixels
            if len(refs) != expected:
                raise HTTPException(422, f"The {encoding} encoding takes {expected} "
                                         f"ciphertext(s) for this model's {g.in_channels}x"
                                         f"{g.height}x{g.width} input, got {len(refs)}.")
            with compute_lock:
                start = time.perf_counter()
                cts = [evaluator.load_input(read_part(body, r)) for r in refs]
                if encoding == "single":
                    out = [("scores", evaluator.single(cts[0], session.keys))]
                else:
                    out = [(f"class{i}", b) for i, b in
                           enumerate(evaluator.batch(cts, session.keys))]
                store.charge(session, cost)
                return out, time.perf_counter() - start

        with store.request(session, cost):
            async with spooled_body(request, limits.max_request_bytes, "request", budget,
                                    limits.body_timeout_s) as (body, size):
                out, seconds = await run_in_threadpool(run, body, size)
        store.touch(session)  # only a successful prediction keeps a session alive
        log.info("session %s: %d image(s), %s encoding, %.3f s", session.log_tag, cost,
                 encoding, seconds)
        return Response(pack("scores", out, encoding=encoding, images_charged=cost,
                             output_scale=model.output_scale),
                        media_type=OCTET, headers={"X-Compute-Seconds": f"{seconds:.4f}"})

    return app


def configure_log() -> logging.Logger:
    """One stderr handler on ``privmed.serve``, however often this is called, and no
    propagation: an imported library configures the root logger, and a second handler or
    the root's would print every line twice."""
    if not any(getattr(h, "_privmed_serve", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        handler._privmed_serve = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return log


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8765,
          limits: ServerLimits | None = None) -> None:
    import uvicorn

    model = HEModel.load(model_path)
    limits = limits or ServerLimits()
    app = create_app(model, limits)
    configure_log()
    # access_log off: request paths carry session ids (the tokens are in headers, which
    # uvicorn does not log, but an id need not be written anywhere either)
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning",
                limit_concurrency=limits.max_connections)


class EncryptedServer:
    """A ``privmed serve`` process started by :func:`serve_encrypted` in the background:
    ``url`` to give :func:`~privmed.encrypted.client.infer_encrypted`; ``close()`` (or
    leaving a ``with`` block) stops it."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: Path) -> None:
        self.process, self.url, self.log_path = process, url, log_path

    def close(self) -> None:
        if self.process.poll() is None:
            stop_process(self.process)

    def __enter__(self) -> EncryptedServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _check_serving(artefact: Path, port: int | None, limits: ServerLimits) -> None:
    if artefact.suffix == ".pt" or artefact.is_dir():
        raise ConfigError(f"{artefact} is a trained model, not a compiled one; run 'privmed "
                          f"encrypted compile {artefact} --data ...' first.")
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"Port {port} is not a valid TCP port.")
    if min(limits.session_ttl_s, limits.max_sessions, limits.max_images_per_session,
           limits.max_inflight_bytes) <= 0:
        raise ConfigError("--session-ttl, --max-sessions, --max-images-per-session and "
                          "--max-inflight-mb must be positive.")


def serve_encrypted(artefact: str | Path, *, host: str = "127.0.0.1", port: int | None = None,
                    limits: ServerLimits | None = None, background: bool = False,
                    log_path: str | Path | None = None,
                    say: Callable[[str], None] | None = print) -> EncryptedServer | None:
    """Serve a compiled ``.he`` artefact for encrypted inference over HTTP.

    Clients send ciphertexts and get encrypted scores back; the server never holds a
    secret key. In the foreground (the ``privmed serve`` command) this blocks on
    ``host:port`` (default 8765) until stopped. ``background=True`` starts the server as
    its own process on a free loopback port (or ``port``), waits until it is healthy and
    returns an :class:`EncryptedServer` (its ``url``, ``close()``; a context manager);
    its log goes to ``log_path`` (default: beside the artefact). ``limits``: sessions,
    their lifetime and image budget, request bodies in flight (in the background: the
    four the command has options for). ::

        with privmed.serve_encrypted("runs/he/model.he", background=True) as server:
            predictions = privmed.infer_encrypted(images, server.url)
    """
    artefact = Path(artefact)
    limits = limits or ServerLimits()
    _check_serving(artefact, port, limits)
    model = HEModel.load(artefact)  # a broken artefact fails here, not in a child process
    if background:
        args = ["--session-ttl", str(limits.session_ttl_s),
                "--max-sessions", str(limits.max_sessions),
                "--max-images-per-session", str(limits.max_images_per_session),
                "--max-inflight-mb", str(max(1, limits.max_inflight_bytes >> 20))]
        log = Path(log_path) if log_path is not None else artefact.with_suffix(".serve.log")
        proc, url = start_server_process(artefact, log, *args, port=port)
        return EncryptedServer(proc, url, log)
    if say is not None:
        from privmed.encrypted.predictions_out import epsilon_text

        say(f"Serving {model.card.get('model')} ({', '.join(model.card['class_names'])}; "
            f"ε = {epsilon_text(model.card)}) on http://{host}:{port or DEFAULT_PORT} "
            "(OpenAPI at /docs). Put TLS in front of it for use beyond this machine.")
    serve(str(artefact), host, port or DEFAULT_PORT, limits)
    return None


def start_server_process(artefact: str | Path, log_path: str | Path, *args: str,
                         timeout: float = 180.0, port: int | None = None
                         ) -> tuple[subprocess.Popen, str]:
    """Start ``privmed serve ARTEFACT`` as its own process on a free loopback port (or
    ``port``) and wait until it is healthy (demo, tests, benchmarks). Returns (process,
    base URL)."""
    import httpx

    def healthy(address: str, port: int) -> bool:
        try:
            return httpx.get(f"http://{address}:{port}/v1/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    port = port or processes.free_port()
    with Path(log_path).open("wb") as log:  # the child keeps its own descriptor
        proc = processes.start([sys.executable, "-m", "privmed", "serve", str(artefact),
                                "--port", str(port), *args],
                               {**os.environ, "PYTHONUNBUFFERED": "1"}, log, new_session=False)
    try:
        processes.wait_for_port("127.0.0.1", port, proc, "encrypted-inference server",
                                Path(log_path), timeout, ready=healthy)
    except BaseException:
        stop_process(proc)
        raise
    return proc, f"http://127.0.0.1:{port}"


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a process started for serving: SIGTERM, then SIGKILL after ``timeout``."""
    processes.stop(proc, wait=timeout)
