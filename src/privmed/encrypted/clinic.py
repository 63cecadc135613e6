"""``privmed clinic``: a page on this computer that encrypts images before they leave it.

The browser talks only to this local process (same origin, enforced by the page's
Content-Security-Policy); the process decodes the dropped file, encrypts it with
:class:`~privmed.encrypted.client.EncryptedClient`, sends ciphertexts to the hospital's
``privmed serve`` and decrypts the scores. The process listens on loopback only and
runs a prediction only for its own page (same origin, a custom header), so other web
sites cannot make it query the hospital (cross-site request forgery).
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import ipaddress
import logging
import math
import re
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import uvicorn
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response

from privmed.encrypted.images import image_from_bytes, preview_png
from privmed.encrypted.validated import decision_rule, decision_text, performance_text
from privmed.errors import ConfigError, DataError, PrivmedError

if TYPE_CHECKING:
    from privmed.encrypted.client import EncryptedClient

log = logging.getLogger(__name__)

DEFAULT_PORT = 8766
MAX_UPLOAD_BYTES = 256 * 1024 * 1024
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
# Sent by the page's script. A cross-origin page can add it only after a CORS preflight,
# which this process never grants; HTML forms cannot add headers at all.
PAGE_HEADER = "X-Privmed-Clinic"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

_STYLE = """
body{font:16px/1.45 system-ui,sans-serif;margin:0 auto;max-width:52rem;padding:1.5rem;
color:#1d2430;background:#f6f7f9}h1{font-size:1.5rem;margin:0 0 .25rem}
#model,.note{color:#566;margin:.25rem 0}
#drop{display:block;border:2px dashed #8a9bb0;border-radius:.75rem;padding:2rem;
text-align:center;background:#fff;margin:1rem 0;cursor:pointer}
#drop.over{border-color:#2463eb;background:#eef3ff}#drop input{margin-top:.75rem}
#result{display:flex;gap:1.5rem;flex-wrap:wrap;align-items:flex-start}#result>div{flex:1 1 16rem}
#preview{max-width:18rem;max-height:18rem;image-rendering:pixelated;border-radius:.5rem;
background:#000}dl{display:grid;grid-template-columns:auto 1fr;gap:.3rem 1rem;margin:0}
dt{color:#566}dd{margin:0;font-weight:600}#label{font-size:1.3rem}
#status{color:#2463eb;min-height:1.5em}body.busy #status::after{content:" \\23F3"}
#error{color:#b3261e;background:#fdecea;padding:.6rem .9rem;border-radius:.5rem}
#probs{list-style:none;padding:0;margin:.5rem 0 0}#probs meter{width:9rem;margin-right:.5rem}
#validated{background:#fff;border-left:4px solid #2463eb;padding:.5rem .8rem;margin:.5rem 0}
#why{color:#566;margin:.4rem 0 0}
#timings{color:#566;font-size:.85rem}
"""

_SCRIPT = """
const $ = (id) => document.getElementById(id);
const gone = "The clinic process cannot be reached; is privmed clinic still running?";
let seq = 0;
function say(id, text) { $(id).textContent = text; }
function fail(msg) { say("status", ""); $("error").textContent = msg; $("error").hidden = false; }
async function detail(r) {
  try { const j = await r.json(); if (typeof j.detail === "string") return j.detail; }
  catch (e) { /* not JSON */ }
  return "The clinic process answered HTTP " + r.status + ".";
}
async function loadModel() {
  try {
    const r = await fetch("api/model");
    if (!r.ok) { fail(await detail(r)); return; }
    const m = await r.json();
    const dp = m.epsilon == null ? "no differential-privacy guarantee"
      : "trained with differential privacy, \\u03b5 = " + Number(m.epsilon).toFixed(2);
    say("model", "Model " + m.model + " \\u00b7 input " + m.input_shape.join("\\u00d7") +
      " \\u00b7 classes " + m.class_names.join(", ") + " \\u00b7 " + dp);
    say("validated", m.validated);
  } catch (e) { fail(gone); }
}
function showPreview(file) {
  const img = $("preview");
  if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
  delete img.dataset.url;
  img.hidden = true;
  if (/\\.(png|jpe?g)$/i.test(file.name)) {
    img.dataset.url = URL.createObjectURL(file);
    img.src = img.dataset.url; img.hidden = false;
  } else { img.removeAttribute("src"); }
}
function showResult(p) {
  const img = $("preview");
  img.src = p.preview; img.hidden = false;
  say("label", p.label);
  say("why", p.decision);
  say("score", p.score.toFixed(3) + (p.threshold == null ? ""
    : " for " + p.positive_class + " (threshold " + p.threshold.toFixed(3) + ")"));
  $("score").dataset.value = p.score;
  say("seconds", p.seconds.toFixed(2) + " s");
  $("seconds").dataset.value = p.seconds;
  say("timings", Object.entries(p.timings || {}).filter(([k]) => k !== "total").map(
    ([k, v]) => k.endsWith("_bytes") ? k.slice(0, -6) + " " + (v / 1024).toFixed(0) + " KiB"
      : k + " " + v.toFixed(2) + " s").join(" \\u00b7 "));
  $("probs").replaceChildren(...p.class_names.map((name, i) => {
    const li = document.createElement("li"), bar = document.createElement("meter");
    bar.value = p.scores[i];
    li.append(bar, name + " " + p.scores[i].toFixed(3));
    return li;
  }));
}
async function predict(file) {
  const mine = ++seq;
  $("error").hidden = true; say("error", "");
  for (const id of ["label", "why", "score", "seconds", "timings"]) say(id, "");
  $("probs").replaceChildren();
  showPreview(file);
  say("status", "Encrypting " + file.name + " here and waiting for the hospital server\\u2026");
  document.body.classList.add("busy");
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const r = await fetch("api/predict",
      {method: "POST", body: form, headers: {"X-Privmed-Clinic": "1"}});
    const body = r.ok ? await r.json() : await detail(r);
    if (mine !== seq) return;
    if (!r.ok) { fail(body); return; }
    say("status", "");
    showResult(body);
  } catch (e) { if (mine === seq) fail(gone); }
  finally { if (mine === seq) document.body.classList.remove("busy"); }
}
const input = $("file"), drop = $("drop");
input.addEventListener("change", () => {
  if (input.files.length) predict(input.files[0]);
  input.value = "";
});
$("preview").addEventListener("error", () => { $("preview").hidden = true; });
for (const ev of ["dragover", "drop"]) window.addEventListener(ev, (e) => e.preventDefault());
drop.addEventListener("dragover", () => drop.classList.add("over"));
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) predict(e.dataTransfer.files[0]);
});
loadModel();
"""

_PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>privmed clinic</title><link rel="icon" href="data:,"><style>{_STYLE}</style></head>
<body><h1>privmed clinic</h1><p id="model">Loading the model card&hellip;</p>
<p id="validated"></p>
<p class="note">Images are encrypted on this computer; the hospital server only ever
receives ciphertexts and this page talks to nothing but the local privmed process.</p>
<label id="drop">Drop a PNG, JPEG or DICOM image here, or choose one:<br>
<input type="file" id="file" accept=".png,.jpg,.jpeg,.dcm,.dicom,image/png,image/jpeg">
</label>
<p id="status" role="status"></p><p id="error" role="alert" hidden></p>
<div id="result"><img id="preview" alt="The image as the model sees it" hidden>
<div><dl><dt>Decision</dt><dd id="label"></dd><dt>Score</dt><dd id="score"></dd>
<dt>Time taken</dt><dd id="seconds"></dd></dl><p id="why"></p><p id="timings"></p>
<p class="note">Scores are the model's uncalibrated outputs, not probabilities of
disease.</p><ul id="probs"></ul></div>
</div><script>{_SCRIPT}</script></body></html>
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Nothing but this origin (and the page's own inline code) may be loaded or contacted.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_csp_hash(_SCRIPT)}; style-src {_csp_hash(_STYLE)}; "
    "img-src 'self' data: blob:; connect-src 'self'; form-action 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


def _host_name(header: str) -> str:
    """``Host`` header -> host name without port (``[::1]:80`` -> ``::1``)."""
    match = re.fullmatch(r"\[([^\]]+)\](?::\d+)?|([^:]*)(?::\d+)?", header.strip())
    return ((match.group(1) or match.group(2) or "") if match else "").lower()


def _from_own_page(request: Request) -> bool:
    """Whether an unsafe request comes from this process's own page: the page's header,
    and where the browser states them, its own Origin and Sec-Fetch-Site same-origin.

    Hand-written: Starlette has no CSRF check (CORSMiddleware only grants access)."""
    if request.headers.get(PAGE_HEADER) != "1":
        return False
    site = request.headers.get("sec-fetch-site")
    if site is not None and site != "same-origin":
        return False
    origin = request.headers.get("origin")
    own = f"{request.url.scheme}://{request.headers.get('host', '')}".lower()
    return origin is None or origin.lower() == own


class _Clients:
    """Creates the encrypted-inference client on first use and serialises predictions."""

    def __init__(self, source: Callable[[], EncryptedClient] | EncryptedClient) -> None:
        is_factory = callable(source) and (inspect.isclass(source)
                                           or not hasattr(source, "predict"))
        self._factory = source if is_factory else None
        self._client = None if is_factory else source
        self._make_lock = threading.Lock()
        self._predict_lock = threading.Lock()

    def get(self) -> EncryptedClient:
        with self._make_lock:
            if self._client is None:
                assert self._factory is not None
                self._client = self._factory()
            return self._client

    def predict(self, image: Any) -> Any:
        client = self.get()
        with self._predict_lock:  # one encrypted query at a time keeps memory and keys simple
            return client.predict(image)


def _http_error(exc: PrivmedError) -> HTTPException:
    """Bad files are the user's to fix (400); everything else is the hospital link (502)."""
    return HTTPException(400 if isinstance(exc, DataError) else 502, str(exc))


def create_clinic_app(client_factory: Callable[[], EncryptedClient] | EncryptedClient,
                      allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES) -> FastAPI:
    """The clinic page and its JSON API around one client (or a factory that makes it).

    Requests whose ``Host`` is not in ``allowed_hosts`` (loopback names by default) are
    refused, so that web pages elsewhere cannot reach the process by DNS rebinding; POSTs
    not from the page itself are refused (403), so that they cannot make it predict.
    """
    clients = _Clients(client_factory)
    hosts = {h.lower().strip("[]") for h in allowed_hosts}
    app = FastAPI(title="privmed clinic", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def _local_only(request: Request, call_next: Callable) -> Response:
        if _host_name(request.headers.get("host", "")) not in hosts:
            return JSONResponse({"detail": "The clinic page only answers requests addressed "
                                           "to this computer (localhost)."}, status_code=400)
        if request.method not in SAFE_METHODS and not _from_own_page(request):
            return JSONResponse({"detail": "The clinic runs predictions only for its own "
                                           "page; requests from other web sites are "
                                           "refused."}, status_code=403)
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    def card() -> dict:
        try:
            return dict(clients.get().card)
        except PrivmedError as exc:
            raise _http_error(exc) from exc

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(_PAGE)

    @app.get("/api/model")
    def model() -> dict:
        info = card()
        # Validated performance in words, so the page shows it as privmed states it.
        return {**info, "validated": performance_text(info),
                "decision_rule": decision_rule(info)}

    @app.post("/api/predict")
    def predict(file: Annotated[UploadFile | None, File()] = None) -> dict:
        if file is None:
            raise HTTPException(400, "Send the image as the multipart form field 'file'.")
        name = file.filename or "upload"
        data = file.file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(400, f"File {name} is larger than "
                                     f"{MAX_UPLOAD_BYTES // 2**20} MiB.")
        info = card()
        try:
            image = image_from_bytes(data, name, tuple(info["input_shape"]))
            result = clients.predict(image)
        except PrivmedError as exc:
            raise _http_error(exc) from exc
        except Exception as exc:  # a bug, not the user's doing: keep the trace in the log
            log.exception("Encrypted prediction for %s failed", name)
            raise HTTPException(500, f"The encrypted prediction failed unexpectedly "
                                     f"({type(exc).__name__}); see the clinic's log.") from exc
        preview = base64.b64encode(preview_png(image)).decode("ascii")
        return {"label": result.label, "class_index": int(result.class_index),
                "score": float(result.score), "scores": [float(p) for p in result.scores],
                "threshold": result.threshold, "positive_class": result.positive_class,
                "decision": decision_text(result.label, result.score, result.threshold,
                                          result.positive_class),
                "class_names": list(info["class_names"]), "seconds": float(result.seconds),
                "timings": {k: float(v) for k, v in (result.timings or {}).items()
                            if isinstance(v, int | float) and math.isfinite(v)},
                "preview": "data:image/png;base64," + preview}

    return app


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_port_free(host: str, port: int) -> None:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            sock.bind((host.strip("[]"), port))
    except OSError as exc:
        raise ConfigError(f"Port {port} on {host} is not free ({exc.strerror or exc}); "
                          "pass another --port.") from exc


def run_clinic(server_url: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
    """Connect to the hospital's ``privmed serve`` and serve the clinic page until Ctrl+C."""
    if not is_loopback(host):
        raise ConfigError(f"The clinic page listens on this computer only (127.0.0.1, "
                          f"localhost or ::1), not on {host}, so images never leave it "
                          "unencrypted.")
    if not 1 <= port <= 65535:
        raise ConfigError(f"Port must be between 1 and 65535, got {port}.")
    _check_port_free(host, port)
    from privmed.encrypted.client import EncryptedClient  # needs TenSEAL: import on use

    client = EncryptedClient(server_url)
    try:
        app = create_clinic_app(client, allowed_hosts=(*LOOPBACK_NAMES, host))
        log.info("Clinic page on http://%s:%d/ for %s", host, port, server_url)
        uvicorn.run(app, host=host.strip("[]"), port=port, log_level="warning")
    finally:
        client.close()
