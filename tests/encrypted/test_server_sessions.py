"""Attacks on sessions of a real ``privmed serve`` process: undercounted batches, sessions
kept alive by junk, cross-site session creation, predictions without the token."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from he_http import OCTET, context_body, is_one_sentence, open_session, serving

from privmed.encrypted.ckks import SecretKeys
from privmed.encrypted.layout import pack_batch
from privmed.encrypted.wire import pack, unpack


@pytest.mark.slow
def test_a_batch_is_charged_every_slot_whatever_count_the_client_declares(
        compiled_he, synthetic_bundle, tmp_path):
    he, artefact = compiled_he
    slots = he.params.slots
    with serving(artefact, tmp_path, "--max-images-per-session", "5000") as (_, url):
        session = open_session(url, he.params)
        images = np.resize(synthetic_bundle.test.images.numpy(), (slots, 1, 28, 28))
        body = pack("ciphertexts", [(f"ct{i}", session.keys.encrypt(row))
                                    for i, row in enumerate(pack_batch(images, slots))])
        # The attack: a full batch that declares one image (the old API's ?images=1).
        first = session.predict(body, "batch", images=1)
        assert first.status_code == 200, first.text
        meta, parts = unpack(first.content, "scores")
        scores = np.stack([session.keys.decrypt(p)[:slots] for _, p in parts], axis=1)
        # the server did compute all 4096 images, so it must charge 4096
        assert np.abs(scores * he.output_scale - he.plain_logits(images)).max() < 0.05
        assert meta["images_charged"] == slots
        second = session.predict(body, "batch", images=1)
        assert second.status_code == 429 and is_one_sentence(second)
        assert "4,096" in second.json()["detail"]
        # 904 images are left: single-image requests are charged one each
        image = synthetic_bundle.test.images[0].numpy()
        assert session.predict(session.single_body(he.layout, image)).status_code == 200


def test_malformed_requests_do_not_keep_a_session_alive(compiled_he, synthetic_bundle,
                                                        tmp_path):
    he, artefact = compiled_he
    ttl = 8.0
    image = synthetic_bundle.test.images[0].numpy()
    with serving(artefact, tmp_path, "--session-ttl", str(ttl)) as (_, url):
        junk = open_session(url, he.params)  # kept "alive" by junk only
        opened = time.monotonic()
        # junk at once, while the session surely lives (a loaded machine may take seconds
        # to open the second session)
        statuses = {junk.predict(b"x").status_code,
                    junk.predict(b"x", headers={"Content-Type": "text/plain"}).status_code}
        used = open_session(url, he.params)  # kept alive by one real prediction
        refreshed = False
        while time.monotonic() - opened < ttl + 1.0:
            statuses.add(junk.predict(b"x").status_code)  # 1 byte: not a message
            statuses.add(junk.predict(b"x", headers={"Content-Type": "text/plain"}
                                      ).status_code)
            if not refreshed and time.monotonic() - opened > ttl / 2:
                assert used.predict(used.single_body(he.layout, image)).status_code == 200
                refreshed = True
            time.sleep(0.2)  # the behaviour under test: junk spread over the whole TTL
        assert {400, 415} <= statuses <= {400, 404, 415}
        expired = junk.predict(junk.single_body(he.layout, image))
        assert expired.status_code == 404 and "expired" in expired.json()["detail"]
        assert used.predict(used.single_body(he.layout, image)).status_code == 200


def test_sessions_and_predictions_need_an_octet_stream_body(he_server):
    url = he_server.url
    before = httpx.get(f"{url}/v1/health").json()["sessions"]
    ctx = context_body(SecretKeys(he_server.he.params), rotations=False)
    # A cross-site page may send text/plain (or a form) without a CORS preflight.
    for headers in ({"Content-Type": "text/plain;charset=UTF-8",
                     "Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
                    {"Content-Type": "application/x-www-form-urlencoded"},
                    {"Content-Type": "multipart/form-data; boundary=x"}, {}):
        reply = httpx.post(f"{url}/v1/sessions", content=ctx, headers=headers, timeout=60)
        assert reply.status_code == 415 and is_one_sentence(reply), headers
    assert httpx.get(f"{url}/v1/health").json()["sessions"] == before
    session = open_session(url, he_server.he.params)
    reply = session.predict(b"x", headers={"Content-Type": "text/plain"})
    assert reply.status_code == 415 and is_one_sentence(reply)


def test_predict_and_close_need_the_sessions_own_token(compiled_he, synthetic_bundle,
                                                       tmp_path):
    he, artefact = compiled_he
    image = synthetic_bundle.test.images[0].numpy()
    with serving(artefact, tmp_path, "--max-images-per-session", "1") as (_, url):
        owner = open_session(url, he.params)
        other = open_session(url, he.params)
        body = owner.single_body(he.layout, image)
        # The attacker knows the session id (say, from a proxy's access log), not the token.
        bare = httpx.post(owner.predict_url, content=body, headers=OCTET, timeout=60)
        assert bare.status_code == 401 and is_one_sentence(bare)
        assert bare.headers["www-authenticate"] == "Bearer"
        for auth in (f"Bearer {other.token}", f"Bearer {owner.token[:-1]}", "Bearer x",
                     f"bearer {owner.token}x", b"Bearer \xe9\xff"):
            reply = httpx.post(owner.predict_url, content=body,
                               headers={**OCTET, "Authorization": auth}, timeout=60)
            assert reply.status_code == 403 and is_one_sentence(reply), auth
        assert httpx.post(owner.predict_url, content=body, timeout=60, headers={
            **OCTET, "Authorization": f"Basic {owner.token}"}).status_code == 401
        close = f"{url}/v1/sessions/{owner.sid}"
        assert httpx.delete(close).status_code == 401
        assert httpx.delete(close, headers=other.auth).status_code == 403
        # None of that was computed or charged: the owner's one image is still there.
        assert owner.predict(body).status_code == 200
        assert owner.predict(body).status_code == 429
        assert httpx.delete(close, headers=owner.auth).status_code == 200
        assert owner.predict(body).status_code == 404
