"""``privmed serve``: the model owner's FastAPI server. It sees ciphertexts and public
evaluation keys only; it returns encrypted scores.

Endpoints (OpenAPI at ``/docs`` and ``/openapi.json``):
``GET /v1/health``, ``GET /v1/model`` (model card), ``POST /v1/sessions`` (upload an
evaluation context), ``POST /v1/sessions/{id}/predict?encoding=single|batch``,
``DELETE /v1/sessions/{id}``. Payloads are ``application/octet-stream`` messages
(``wire.py``). The log carries counts and timings, never payload bytes or session ids.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from privmed.encrypted.ckks import rotation_steps
from privmed.encrypted.compiler import HEModel
from privmed.encrypted.evaluate import EvaluationError, EvaluationKeys, Evaluator
from privmed.encrypted.wire import WireError, pack, unpack

log = logging.getLogger("privmed.serve")
OCTET = "application/octet-stream"
CONTEXT_PARTS = {"relin_keys", "galois_keys"}
SECRET_PARTS = {"secret_key", "secret"}


@dataclass
class ServerLimits:
    session_ttl_s: float = 1800.0
    max_sessions: int = 16
    max_context_bytes: int = 64 << 20
    max_request_bytes: int = 384 << 20
    max_images_per_session: int = 100_000  # bounds model extraction (docs/threat-model.md)


@dataclass
class Session:
    keys: EvaluationKeys
    expires: float
    images: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class SessionStore:
    """Evaluation keys per session id, with expiry (refreshed on use) and a count limit."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def _purge(self, now: float) -> None:
        for sid in [s for s, v in self._sessions.items() if v.expires < now]:
            del self._sessions[sid]

    def add(self, keys: EvaluationKeys) -> str:
        now = time.monotonic()
        with self._lock:
            self._purge(now)
            if len(self._sessions) >= self.limits.max_sessions:
                raise HTTPException(503, "The server holds its maximum number of sessions; "
                                         "retry after one expires or is closed.")
            sid = secrets.token_urlsafe(32)  # bearer token from the OS CSPRNG
            self._sessions[sid] = Session(keys, now + self.limits.session_ttl_s)
            return sid

    def get(self, sid: str) -> Session:
        now = time.monotonic()
        with self._lock:
            self._purge(now)
            session = self._sessions.get(sid)
            if session is None:
                raise HTTPException(404, "Unknown or expired session; upload the evaluation "
                                         "context again.")
            session.expires = now + self.limits.session_ttl_s
            return session

    def remove(self, sid: str) -> bool:
        with self._lock:
            return self._sessions.pop(sid, None) is not None

    def __len__(self) -> int:
        return len(self._sessions)


async def _read_body(request: Request, limit: int, what: str) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"The {what} is {int(declared):,} bytes; this server accepts "
                                 f"at most {limit:,}.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"The {what} exceeds this server's limit of {limit:,} "
                                     "bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def model_card(model: HEModel, limits: ServerLimits) -> dict[str, Any]:
    card = {**model.card, "geometry": model.geometry.to_dict(), "ckks": model.params.to_dict(),
            "output_scale": model.output_scale}
    g = model.geometry
    card["encodings"] = {
        "single": {"ciphertexts": 1, "images": 1,
                   "rotations": rotation_steps(model.params.slots),
                   "score_offsets": model.layout.class_offsets()},
        "batch": {"ciphertexts": g.pixels, "images_per_request": model.params.slots},
    }
    card["limits"] = {"session_ttl_s": limits.session_ttl_s,
                      "max_images_per_session": limits.max_images_per_session,
                      "max_request_bytes": limits.max_request_bytes,
                      "max_context_bytes": limits.max_context_bytes}
    return card


def create_app(model: HEModel, limits: ServerLimits | None = None) -> FastAPI:
    limits = limits or ServerLimits()
    evaluator = Evaluator(model)
    store = SessionStore(limits)
    compute_lock = threading.Lock()  # SEAL holds the GIL: one evaluation at a time
    card = model_card(model, limits)
    app = FastAPI(title="privmed encrypted inference",
                  description="CKKS inference: the server computes on ciphertexts and never "
                              "sees images or secret keys.", version="1")
    app.state.store = store

    @app.exception_handler(WireError)
    @app.exception_handler(EvaluationError)
    async def _bad_input(_: Request, exc: Exception) -> Response:
        log.info("rejected a request: %s", exc)
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": card.get("model"), "sessions": len(store)}

    @app.get("/v1/model")
    def model_info() -> dict[str, Any]:
        return card

    @app.post("/v1/sessions", status_code=201)
    async def create_session(request: Request) -> dict[str, Any]:
        body = await _read_body(request, limits.max_context_bytes, "evaluation context")
        _, parts = unpack(body, "context")
        names = [n for n, _ in parts]
        if SECRET_PARTS & set(names):
            raise HTTPException(400, "This context contains a secret key: send only the public "
                                     "evaluation keys (the server must never hold your secret "
                                     "key).")
        unknown = set(names) - CONTEXT_PARTS
        if unknown or len(set(names)) != len(names) or "relin_keys" not in names:
            raise HTTPException(400, "An evaluation context holds relin_keys and optionally "
                                     f"galois_keys, once each; got {sorted(names)}.")
        blobs = dict(parts)
        keys = await run_in_threadpool(evaluator.load_keys, blobs["relin_keys"],
                                       blobs.get("galois_keys"))
        sid = store.add(keys)
        log.info("session opened (%d bytes of keys, rotations: %s)", len(body),
                 keys.galois is not None)
        return {"session": sid, "expires_in_s": limits.session_ttl_s,
                "encodings": ["single", "batch"] if keys.galois is not None else ["batch"]}

    @app.delete("/v1/sessions/{sid}")
    def close_session(sid: str) -> dict[str, bool]:
        if not store.remove(sid):
            raise HTTPException(404, "Unknown or expired session.")
        return {"closed": True}

    @app.post("/v1/sessions/{sid}/predict")
    async def predict(sid: str, request: Request, encoding: str = "single",
                      images: int = 1) -> Response:
        session = store.get(sid)
        if encoding not in ("single", "batch"):
            raise HTTPException(422, f"Unknown encoding '{encoding}'; use single or batch.")
        cap = 1 if encoding == "single" else model.params.slots
        if not 1 <= images <= cap:
            raise HTTPException(422, f"The {encoding} encoding carries 1 to {cap} images, "
                                     f"not {images}.")
        body = await _read_body(request, limits.max_request_bytes, "request")
        _, parts = unpack(body, "ciphertexts")
        expected = 1 if encoding == "single" else model.geometry.pixels
        if len(parts) != expected:
            raise HTTPException(422, f"The {encoding} encoding takes {expected} ciphertext(s) "
                                     f"for this model's {model.geometry.in_channels}x"
                                     f"{model.geometry.height}x{model.geometry.width} input, "
                                     f"got {len(parts)}.")
        with session.lock:
            cap_images = limits.max_images_per_session
            if session.images + images > cap_images:
                raise HTTPException(429, f"This session has used its {cap_images:,} images; "
                                         "open a new session later.")
            session.images += images

        def run() -> tuple[list[tuple[str, bytes]], float]:
            with compute_lock:
                start = time.perf_counter()
                cts = [evaluator.load_input(data) for _, data in parts]
                if encoding == "single":
                    out = [("scores", evaluator.single(cts[0], session.keys))]
                else:
                    out = [(f"class{i}", b) for i, b in
                           enumerate(evaluator.batch(cts, session.keys))]
                return out, time.perf_counter() - start

        out, seconds = await run_in_threadpool(run)
        tag = hashlib.sha256(sid.encode()).hexdigest()[:8]  # correlates lines, reveals nothing
        log.info("session %s: %d image(s), %s encoding, %.3f s", tag, images, encoding, seconds)
        return Response(pack("scores", out, encoding=encoding, images=images,
                             output_scale=model.output_scale),
                        media_type=OCTET, headers={"X-Compute-Seconds": f"{seconds:.4f}"})

    return app


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8765,
          limits: ServerLimits | None = None) -> None:
    import uvicorn

    model = HEModel.load(model_path)
    app = create_app(model, limits)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    # access_log off: request paths carry session ids, which are bearer tokens.
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning")


def start_server_process(artefact: str | Path, log_path: str | Path, *args: str,
                         timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Start ``privmed serve ARTEFACT`` as its own process on a free loopback port and wait
    until it is healthy (demo, tests, benchmarks). Returns (process, base URL)."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with Path(log_path).open("wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "privmed", "serve", str(artefact),
                                 "--port", str(port), *args], stdout=log,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"privmed serve exited: {Path(log_path).read_text()[-500:]}")
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"privmed serve did not become healthy within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a process started for serving: SIGTERM, then SIGKILL after ``timeout``."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
