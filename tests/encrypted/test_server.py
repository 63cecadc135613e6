"""``privmed serve`` as a real process on loopback, driven by the real client."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import numpy as np
import pytest
from he_http import OCTET, is_one_sentence, open_session
from procs import wait_until

from privmed.encrypted.ckks import SecretKeys, choose_params
from privmed.encrypted.client import EncryptedClient
from privmed.encrypted.server import stop_process
from privmed.encrypted.wire import pack
from privmed.errors import DataError, NetworkError


def test_health_and_model_card(he_server):
    assert httpx.get(f"{he_server.url}/v1/health").json()["status"] == "ok"
    card = httpx.get(f"{he_server.url}/v1/model").json()
    assert card["input_shape"] == [1, 28, 28]
    assert card["class_names"] == he_server.he.card["class_names"]
    assert "epsilon" in card and card["epsilon"] is None  # trained without DP
    assert card["ckks"]["poly_modulus_degree"] == 8192 and card["ckks"]["security_bits"] == 128
    assert card["calibration"] == "synthetic"
    # The validated performance and decision rule travel with the model (issue 15).
    op, perf = card["operating_point"], card["performance"]
    assert op["positive_class"] == "opacity" and op["chosen_on"] == "val"
    assert perf["split"] == "test" and perf["n"] == 300 and perf["positive_class"] == "opacity"
    assert perf["threshold"] == op["threshold"]
    assert perf["roc_auc_ci"][0] <= perf["roc_auc"] <= perf["roc_auc_ci"][1]
    assert {"sensitivity", "sensitivity_ci", "specificity", "specificity_ci"} <= set(perf)
    spec = httpx.get(f"{he_server.url}/openapi.json").json()
    assert {"/v1/health", "/v1/model", "/v1/sessions",
            "/v1/sessions/{sid}/predict"} <= set(spec["paths"])


def test_single_and_batch_inference_match_plaintext(he_server, synthetic_bundle):
    images = synthetic_bundle.test.images[:40].numpy()
    plain = he_server.plain_logits(images)
    with EncryptedClient(he_server.url) as client:
        op = client.card["operating_point"]  # the threshold chosen on validation images
        assert op["positive_class"] == "opacity" and 0 <= op["threshold"] <= 1
        for image in images[:3]:
            pred = client.predict(image)
            assert pred.class_index == he_server.plain_predict(image)
            assert pred.label == client.class_names[pred.class_index]
            assert pred.positive_class == "opacity" and pred.threshold == op["threshold"]
            assert pred.score == pytest.approx(pred.scores[1]) and pred.seconds > 0
            assert (pred.label == "opacity") == (pred.score >= op["threshold"])
        logits = client.logits_batch(images)
    assert logits.shape == plain.shape
    assert np.abs(logits - plain).max() < 0.05
    assert (logits.argmax(1) == plain.argmax(1)).all()


def _post(url: str, body: bytes) -> httpx.Response:
    return httpx.post(url, content=body, headers=OCTET, timeout=60)


def test_a_context_with_the_secret_key_is_refused(he_server):
    keys = SecretKeys(he_server.he.params)
    parts = list(keys.evaluation_keys(rotations=False).items())
    reply = _post(f"{he_server.url}/v1/sessions",
                  pack("context", [*parts, ("secret_key", keys.secret_key_bytes())]))
    assert reply.status_code == 400 and "secret key" in reply.json()["detail"]


def test_bad_contexts_and_ciphertexts_get_4xx_and_the_server_keeps_serving(he_server):
    url = he_server.url
    assert _post(f"{url}/v1/sessions", b"\x00garbage").status_code == 400
    assert _post(f"{url}/v1/sessions", pack("context", [("relin_keys", b"junk")])
                 ).status_code == 400
    foreign = SecretKeys(choose_params(depth=5, scale_bits=25))
    reply = _post(f"{url}/v1/sessions",
                  pack("context", list(foreign.evaluation_keys(rotations=False).items())))
    assert reply.status_code == 400 and "do not match" in reply.json()["detail"]
    big = httpx.post(f"{url}/v1/sessions", content=b"x" * (65 << 20), headers=OCTET)
    assert big.status_code == 413

    session = open_session(url, he_server.he.params, rotations=False)
    ct = session.keys.encrypt(np.zeros(16))
    assert session.predict(pack("ciphertexts", [("ct0", ct)])
                           ).status_code == 400  # no Galois keys in this session
    reply = session.predict(pack("ciphertexts", [("ct0", ct)]), "batch")
    assert reply.status_code == 422 and "784" in reply.json()["detail"]
    reply = session.predict(pack("ciphertexts", [(f"ct{i}", b"\x01" * 64) for i in range(784)]),
                            "batch")
    assert reply.status_code == 400 and "malformed" in reply.json()["detail"]
    reply = session.predict(b"", "fancy")
    assert reply.status_code == 422 and is_one_sentence(reply)
    truncated = pack("ciphertexts", [("ct0", ct)])[:-10]
    assert session.predict(truncated).status_code == 400
    assert httpx.post(f"{url}/v1/sessions/not-a-session/predict", content=b"",
                      headers={**OCTET, **session.auth}).status_code == 404
    assert httpx.delete(f"{url}/v1/sessions/{session.sid}", headers=session.auth
                        ).status_code == 200
    assert session.predict(pack("ciphertexts", [("ct0", ct)])).status_code == 404
    assert httpx.get(f"{url}/v1/health").status_code == 200


def test_sessions_expire_and_are_rate_limited(compiled_he, tmp_path, synthetic_bundle,
                                              server_factory):
    _, artefact = compiled_he
    proc, url = server_factory(artefact, tmp_path / "serve.log", "--session-ttl", "2",
                             "--max-images-per-session", "2")
    try:
        image = synthetic_bundle.test.images[0].numpy()
        client = EncryptedClient(url)
        client.predict(image)
        client.predict(image)
        with pytest.raises(NetworkError, match="429"):
            client.predict(image)
        time.sleep(2.5)  # the behaviour under test: the 2 s session TTL running out
        with pytest.raises(NetworkError, match="expired"):
            client.predict(image)
        client.close()
    finally:
        stop_process(proc)


class RecordingProxy:
    """A loopback TCP proxy that keeps every byte the client sends to the server."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.sent = bytearray()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if record:
                    self.sent.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            dst.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False),
                             daemon=True).start()


def test_the_server_never_receives_the_image_or_the_secret_key(he_server, synthetic_bundle):
    proxy = RecordingProxy(int(he_server.url.rsplit(":", 1)[1]))
    image = synthetic_bundle.test.images[1].numpy()
    with EncryptedClient(f"http://127.0.0.1:{proxy.port}") as client:
        client.predict(image)
        client.logits_batch(image[None])
        secret = client.keys.secret_key_bytes()
    sent = bytes(proxy.sent)
    assert len(sent) > 1_000_000  # the context and ciphertexts did pass through
    from privmed.encrypted.layout import pack_single
    forms = [image.astype(np.float32).tobytes(), image.astype(np.float64).tobytes(),
             np.round(image * 255).astype(np.uint8).tobytes(),
             pack_single(client.layout, image).tobytes()]
    for form in forms:  # any 64-byte window of the image in any plain encoding
        for start in range(0, len(form) - 64, 997):
            assert form[start:start + 64] not in sent
    assert secret[-64:] not in sent and secret[16:80] not in sent


def test_server_log_holds_no_payload_or_session_ids(he_server, synthetic_bundle):
    with EncryptedClient(he_server.url) as client:
        client.predict(synthetic_bundle.test.images[2].numpy())
        sid, auth = client._session, client._auth["Authorization"]
    wait_until(lambda: "1 image(s), single encoding" in he_server.log_path.read_text(
        errors="replace"), 30, "the server to log the prediction")  # it follows the reply
    log = he_server.log_path.read_text(errors="replace")
    assert "1 image(s), single encoding" in log
    assert sid not in log and auth.split()[1] not in log
    assert max((len(w) for w in log.split()), default=0) < 64  # no encoded blobs


def test_client_errors_are_one_sentence():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(NetworkError, match="cannot be reached"):
        EncryptedClient(f"http://127.0.0.1:{port}")


def test_client_refuses_images_of_the_wrong_shape(he_server):
    with EncryptedClient(he_server.url) as client, pytest.raises(DataError, match="shape"):
        client.predict(np.zeros((1, 32, 32)))
