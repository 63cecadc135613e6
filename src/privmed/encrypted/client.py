"""The clinic's side: keys, encryption and decryption stay in this process.

``EncryptedClient(url).predict(image)`` encrypts one image (single encoding: one
ciphertext, low latency); ``predict_batch(images)`` packs up to 4096 images across the
slots of one ciphertext per pixel (throughput on an archive). The server charges every
batch request as 4096 images against the session's budget, however few it carries.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from privmed.encrypted.ckks import CKKSParams, SecretKeys
from privmed.encrypted.layout import (
    Geometry,
    SingleLayout,
    pack_batch,
    pack_single,
    unpack_single,
)
from privmed.encrypted.wire import WireError, pack, unpack
from privmed.errors import ConfigError, DataError, NetworkError

OCTET = {"Content-Type": "application/octet-stream"}


@dataclass
class Prediction:
    """One decision. ``scores`` are the model's softmax outputs: uncalibrated scores, not
    probabilities. A binary model with a recorded operating point decides
    ``positive_class`` when its score (``score``) is at least ``threshold``; otherwise the
    class with the highest score is decided and ``score`` is that class's."""

    class_index: int
    label: str
    score: float
    scores: list[float]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    threshold: float | None = None
    positive_class: str | None = None

    @property
    def probability(self) -> float:
        """Old name of ``score`` (it was never a calibrated probability)."""
        return self.score

    @property
    def probabilities(self) -> list[float]:
        """Old name of ``scores``."""
        return self.scores


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


class EncryptedClient:
    """Talks to ``privmed serve``. The secret key is made here and never sent."""

    def __init__(self, server_url: str, timeout: float = 300.0) -> None:
        self.url = server_url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout, trust_env=False)
        self.card = self._get_card()
        self.params = CKKSParams.from_dict(self.card["ckks"])
        self.geometry = Geometry.from_dict(self.card["geometry"])
        self.layout = SingleLayout(self.geometry, self.params.slots)
        self.class_names: list[str] = list(self.card["class_names"])
        self.output_scale = float(self.card.get("output_scale", 1.0))
        self._keys: SecretKeys | None = None
        self._session: str | None = None
        self._auth: dict[str, str] = {}  # the session's bearer token, sent with each request
        self.bytes_up = 0
        self.context_bytes: dict[str, int] = {}  # size of each evaluation key sent, by name
        self.bytes_down = 0

    # --- HTTP ---------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise NetworkError(f"The encrypted-inference server at {self.url} cannot be "
                               f"reached ({type(exc).__name__}).") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = None
            raise NetworkError(f"The server refused the request (HTTP {response.status_code}): "
                               f"{detail or response.reason_phrase}")
        return response

    def _get_card(self) -> dict[str, Any]:
        card = self._request("GET", "/v1/model")
        try:
            data = card.json()
            data["ckks"], data["geometry"], data["class_names"]  # noqa: B018
        except (ValueError, KeyError, TypeError):
            raise NetworkError(f"{self.url} is not a privmed encrypted-inference server "
                               "(no model card at /v1/model).") from None
        return data

    @property
    def keys(self) -> SecretKeys:
        if self._keys is None:
            self._keys = SecretKeys(self.params)
        return self._keys

    def _open_session(self) -> str:
        if self._session is None:
            parts = list(self.keys.evaluation_keys(rotations=True).items())
            self.context_bytes = {name: len(data) for name, data in parts}
            body = pack("context", parts)
            self.bytes_up += len(body)
            reply = self._request("POST", "/v1/sessions", content=body, headers=OCTET)
            try:
                opened = reply.json()
                self._auth = {"Authorization": f"Bearer {opened['token']}"}
                self._session = str(opened["session"])
            except (ValueError, KeyError, TypeError):
                raise NetworkError(f"{self.url} did not answer with a session and a token; "
                                   "is it a privmed encrypted-inference server?") from None
        return self._session

    def _predict(self, cts: list[bytes], encoding: str) -> tuple[list[bytes], float]:
        body = pack("ciphertexts", [(f"ct{i}", c) for i, c in enumerate(cts)])
        sid = self._open_session()
        reply = self._request("POST", f"/v1/sessions/{sid}/predict",
                              params={"encoding": encoding}, content=body,
                              headers={**OCTET, **self._auth})
        self.bytes_up += len(body)
        self.bytes_down += len(reply.content)
        try:
            _, parts = unpack(reply.content, "scores")
        except WireError as exc:
            raise NetworkError(f"The server's reply is malformed: {exc}") from None
        return [p for _, p in parts], float(reply.headers.get("X-Compute-Seconds", "nan"))

    # --- inference ----------------------------------------------------------------------
    def _check(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.float64)
        shape = (self.geometry.in_channels, self.geometry.height, self.geometry.width)
        if images.shape[-3:] != shape:
            raise DataError(f"Images of shape {images.shape[-3:]} do not match the model's "
                            f"input {shape}; load them with load_image_for_model.")
        if not np.isfinite(images).all():
            raise DataError("Images contain NaN or infinite pixel values.")
        return images

    def logits_single(self, image: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """Encrypted scores for one ``C x H x W`` image; returns (logits, timings)."""
        image = self._check(image)
        self._open_session()  # key generation and upload are not per-image latency
        t0 = time.perf_counter()
        ct = self.keys.encrypt(pack_single(self.layout, image))
        t1 = time.perf_counter()
        (result,), server_s = self._predict([ct], "single")
        t2 = time.perf_counter()
        slots = self.keys.decrypt(result)
        logits = unpack_single(self.layout, slots) * self.output_scale
        t3 = time.perf_counter()
        return logits, {"encrypt": t1 - t0, "request": t2 - t1, "server": server_s,
                        "decrypt": t3 - t2, "total": t3 - t0, "upload_bytes": len(ct)}

    def decrypt_raw(self, result: bytes) -> np.ndarray:
        """Every slot of a result ciphertext (for audits of what the server returns)."""
        return self.keys.decrypt(result)

    def predict(self, image: np.ndarray) -> Prediction:
        logits, timings = self.logits_single(image)
        return self._prediction(logits, timings)

    def logits_batch(self, images: np.ndarray,
                     progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Encrypted scores for ``N x C x H x W`` images, packed 4096 per request."""
        images = self._check(images)
        if images.ndim != 4:
            raise DataError("Batch inference takes N x C x H x W images.")
        out, step = [], self.params.slots
        for start in range(0, len(images), step):
            chunk = images[start:start + step]
            cts = [self.keys.encrypt(row) for row in pack_batch(chunk, self.params.slots)]
            results, _ = self._predict(cts, "batch")
            if len(results) != self.geometry.classes:
                raise NetworkError("The server returned the wrong number of score "
                                   "ciphertexts.")
            scores = np.stack([self.keys.decrypt(r)[:len(chunk)] for r in results], axis=1)
            out.append(scores * self.output_scale)
            if progress is not None:
                progress(len(chunk))
        return np.concatenate(out)

    def predict_batch(self, images: np.ndarray,
                      progress: Callable[[int], None] | None = None) -> list[Prediction]:
        start = time.perf_counter()
        logits = self.logits_batch(images, progress)
        per_image = (time.perf_counter() - start) / max(1, len(logits))
        return [self._prediction(row, {"total": per_image}) for row in logits]

    def _prediction(self, logits: np.ndarray, timings: dict[str, float]) -> Prediction:
        probs = _softmax(np.asarray(logits, dtype=np.float64))
        scores = [float(p) for p in probs]
        seconds = float(timings.get("total", 0.0))
        op = self.card.get("operating_point")
        if op and len(self.class_names) == 2:  # the threshold the model was validated at
            pos, threshold = int(op["positive_index"]), float(op["threshold"])
            idx = pos if probs[pos] >= threshold else 1 - pos
            return Prediction(idx, self.class_names[idx], scores[pos], scores, seconds,
                              timings, threshold, self.class_names[pos])
        idx = int(np.argmax(probs))
        return Prediction(idx, self.class_names[idx], scores[idx], scores, seconds, timings)

    def close(self) -> None:
        if self._session is not None:
            # the server forgets the session at expiry anyway
            with contextlib.suppress(httpx.HTTPError):
                self._http.delete(f"/v1/sessions/{self._session}", headers=self._auth)
            self._session = None
            self._auth = {}
        self._http.close()

    def __enter__(self) -> EncryptedClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


__all__ = ["ConfigError", "EncryptedClient", "Prediction"]


DEFAULT_SERVER = "http://127.0.0.1:8765"


def infer_encrypted(images: Sequence[str | Path] | np.ndarray,
                    server: str | EncryptedClient = DEFAULT_SERVER, *, batch: bool = False,
                    progress: Callable[[int], None] | None = None) -> list[Prediction]:
    """Classify ``images`` on an encrypted-inference server; the keys stay here.

    ``images``: PNG, JPEG or DICOM files (read and resized to the model's input), or an
    array of ``N x C x H x W`` (or one ``C x H x W``) images in [0, 1]. ``server``: the
    base URL of a ``privmed serve`` server (or an open :class:`EncryptedClient`). Each
    image is encrypted here, computed on encrypted, and its scores decrypted here: one
    ciphertext per image, or with ``batch=True`` up to 4096 images packed per request
    (throughput). ``progress(n)`` is called as ``n`` more images are done. Returns one
    :class:`Prediction` per image (decision, uncalibrated scores, timings). ::

        predictions = privmed.infer_encrypted(bundle.test.images[:8].numpy(), server.url)
    """
    if isinstance(server, EncryptedClient):
        return _infer(server, images, batch, progress)
    with EncryptedClient(server) as client:
        return _infer(client, images, batch, progress)


def _infer(client: EncryptedClient, images: Sequence[str | Path] | np.ndarray, batch: bool,
           progress: Callable[[int], None] | None) -> list[Prediction]:
    from privmed.encrypted.images import load_image_for_model

    shape = tuple(client.card["input_shape"])
    if isinstance(images, np.ndarray) or hasattr(images, "numpy"):
        arrays = np.asarray(images.numpy() if hasattr(images, "numpy") else images)
        if arrays.ndim == len(shape):
            arrays = arrays[None]
    else:
        paths = list(images)
        arrays = (np.stack([load_image_for_model(Path(p), shape) for p in paths]) if paths
                  else np.zeros((0, *shape)))
    if len(arrays) == 0:
        return []
    if batch:
        return client.predict_batch(arrays, progress=progress)
    preds = []
    for a in arrays:
        preds.append(client.predict(a))
        if progress is not None:
            progress(1)
    return preds
