"""Cross-site request forgery against a real ``privmed clinic`` process: another web site
must not make the clinic run a prediction (and query the hospital) on its behalf."""

from __future__ import annotations

import io

import httpx
import numpy as np
from he_http import is_one_sentence, predictions_logged
from PIL import Image

from privmed.encrypted.clinic import PAGE_HEADER

EVIL = "https://evil.example"
# What browsers send for requests another page starts (header sets as Chromium sends them).
ATTACKS = {
    "form post from another site": {"Origin": EVIL, "Sec-Fetch-Site": "cross-site",
                                    "Sec-Fetch-Mode": "navigate"},
    "no-cors fetch from another site": {"Origin": EVIL, "Sec-Fetch-Site": "cross-site",
                                        "Sec-Fetch-Mode": "no-cors"},
    "page on another port of this computer": {"Origin": "http://127.0.0.1:1",
                                              "Sec-Fetch-Site": "same-site"},
    "sandboxed frame": {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
    "another site naming the page header": {"Origin": EVIL, PAGE_HEADER: "1"},
    "old browser's form (no Origin, no Sec-Fetch)": {},
    "page header but another site's fetch metadata": {PAGE_HEADER: "1",
                                                      "Sec-Fetch-Site": "cross-site"},
}


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.round(image[0] * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_other_sites_cannot_make_the_clinic_predict(clinic_url, he_server, synthetic_bundle):
    files = {"file": ("scan.png", _png(synthetic_bundle.test.images[3].numpy()), "image/png")}
    before = predictions_logged(he_server.log_path)
    for name, headers in ATTACKS.items():
        reply = httpx.post(f"{clinic_url}/api/predict", files=files, headers=headers,
                           timeout=300)
        assert reply.status_code == 403 and is_one_sentence(reply), name
    assert predictions_logged(he_server.log_path) == before  # the hospital computed nothing
    # A browser asks before sending the page header cross-origin; the clinic never agrees.
    preflight = httpx.options(f"{clinic_url}/api/predict", headers={
        "Origin": EVIL, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": PAGE_HEADER.lower()})
    assert "access-control-allow-origin" not in preflight.headers
    # The page itself (same origin, its header) still gets its prediction.
    reply = httpx.post(f"{clinic_url}/api/predict", files=files, timeout=300, headers={
        "Origin": clinic_url, "Sec-Fetch-Site": "same-origin", PAGE_HEADER: "1"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["label"] in he_server.he.card["class_names"]
    assert predictions_logged(he_server.log_path, expected=before + 1) == before + 1
