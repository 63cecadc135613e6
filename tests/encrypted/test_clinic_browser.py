"""The clinic page end to end: headless Chromium -> ``privmed clinic`` -> ``privmed serve``.

The browser only ever talks to the local clinic process, which encrypts the image, asks a
real ``privmed serve`` (the ``he_server`` fixture; ``clinic_url`` is in conftest.py) and
decrypts the scores. Needs the system Chromium and chromedriver (``make browser``);
skipped without them.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from he_http import predictions_logged
from PIL import Image
from pydicom.data import get_testdata_file

from privmed.encrypted.clinic import run_clinic
from privmed.encrypted.images import image_from_bytes, load_image_for_model
from privmed.errors import ConfigError, DataError

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync")
PREDICT_TIMEOUT = 300.0  # seconds for one encrypted round trip, key upload included
# CKKS results carry ~1e-3 noise: another decision is only tolerated at the threshold.
TIE_GAP = 0.02


def _missing_browser() -> str | None:
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[dev]')"
    for tool in (CHROMIUM, CHROMEDRIVER):
        if not tool.exists():
            return f"{tool} is missing (make browser installs chromium and chromium-driver)"
    return None


needs_browser = pytest.mark.skipif(_missing_browser() is not None,
                                   reason=_missing_browser() or "")


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.load(response)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _write_png(path: Path, shape: list[int], seed: int) -> Path:
    """A smooth synthetic image at the model's input size (no resize on either side)."""
    c, h, w = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    planes = [np.sin(rng.uniform(2, 8) * xx + rng.uniform(0, 6)) *
              np.cos(rng.uniform(2, 8) * yy) for _ in range(c)]
    arr = np.round((np.stack(planes, axis=-1) + 1) * 127.5).astype(np.uint8)
    Image.fromarray(arr[..., 0] if c == 1 else arr).save(path)
    return path


def _text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text.strip()


def _predict_in_page(driver, png: Path, he_server, card: dict) -> None:
    """Upload ``png`` through the file input; check the page against the plaintext model."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script(  # record every status text, however briefly it is shown
        "window.statuses = []; const s = document.getElementById('status');"
        "new MutationObserver(() => statuses.push(s.textContent))"
        ".observe(s, {childList: true, characterData: true, subtree: true});")
    driver.find_element(By.ID, "file").send_keys(str(png))
    WebDriverWait(driver, PREDICT_TIMEOUT).until(
        lambda d: _text(d, "label") or _text(d, "error"))
    assert not _text(driver, "error"), _text(driver, "error")
    assert any(s.startswith("Encrypting") for s in driver.execute_script("return statuses"))

    label = _text(driver, "label")
    assert label in card["class_names"]
    # An uncalibrated score, never shown as a probability or a percentage.
    op = card["operating_point"]
    score = float(driver.find_element(By.ID, "score").get_attribute("data-value"))
    assert 0.0 <= score <= 1.0
    assert _text(driver, "score") == (f"{score:.3f} for {op['positive_class']} (threshold "
                                      f"{op['threshold']:.3f})")
    assert (label == op["positive_class"]) == (score >= op["threshold"])
    why = _text(driver, "why")
    assert why.startswith(f"{label}: the score for {op['positive_class']} is {score:.3f}")
    assert f"the threshold {op['threshold']:.3f}" in why
    assert "%" not in _text(driver, "result") and "Probability" not in _text(driver, "result")
    assert float(driver.find_element(By.ID, "seconds").get_attribute("data-value")) > 0
    assert _text(driver, "seconds").endswith(" s")
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "const i = document.getElementById('preview');"
        "return i.src.startsWith('data:image/png') && i.complete && i.naturalWidth > 0;"))

    image = load_image_for_model(png, tuple(card["input_shape"]))
    expected = card["class_names"][he_server.plain_predict(image)]
    if label != expected:  # allowed only where the encrypted score is at the threshold
        assert abs(score - op["threshold"]) < TIE_GAP, (label, expected, score)


@needs_browser
@pytest.mark.slow
def test_clinic_page_predicts_encrypted(clinic_url, he_server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    card = _get_json(f"{clinic_url}/api/model")
    assert card["class_names"] and len(card["input_shape"]) == 3
    browser.get(f"{clinic_url}/")
    WebDriverWait(browser, 60).until(lambda d: str(card["model"]) in _text(d, "model"))
    # The model's validated performance, at its operating point, before any image.
    perf, op = card["performance"], card["operating_point"]
    validated = _text(browser, "validated")
    assert validated.startswith(f"Validated on {perf['n']} test images: ROC-AUC "
                                f"{perf['roc_auc']:.3f} (95% CI {perf['roc_auc_ci'][0]:.3f}-")
    assert (f"sensitivity {perf['sensitivity']:.3f} (95% CI "
            f"{perf['sensitivity_ci'][0]:.3f}-{perf['sensitivity_ci'][1]:.3f}) for opacity"
            in validated)
    assert f"specificity {perf['specificity']:.3f}" in validated and "for normal" in validated
    assert f"opacity when its score is at least {op['threshold']:.3f}" in validated
    assert "Positive class: opacity." in validated

    _predict_in_page(browser, _write_png(tmp_path / "first.png", card["input_shape"], 1),
                     he_server, card)

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not image data" * 8)
    browser.find_element(By.ID, "file").send_keys(str(bad))
    WebDriverWait(browser, 60).until(lambda d: _text(d, "error"))
    error = _text(browser, "error")
    assert browser.find_element(By.ID, "error").is_displayed()
    assert "broken.png" in error and error.endswith(".") and "\n" not in error
    assert "Traceback" not in error
    assert _text(browser, "label") == ""

    _predict_in_page(browser, _write_png(tmp_path / "second.png", card["input_shape"], 2),
                     he_server, card)
    assert not browser.find_element(By.ID, "error").is_displayed()

    # Everything the page loaded or sent went to the clinic process itself.
    origin = browser.execute_script("return location.origin")
    urls = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith((origin + "/", "data:", "blob:")) for u in urls), urls


_EVIL_PAGE = """<!doctype html><html><body>
<form id="f" method="post" enctype="multipart/form-data" action="CLINIC/api/predict">
<input type="file" name="file" id="i"></form><script>
const png = Uint8Array.from(atob("PNG"), (c) => c.charCodeAt(0));
const file = new File([png], "scan.png", {type: "image/png"});
window.outcomes = {};
async function attempt(name, init) {
  const form = new FormData();
  form.append("file", file);
  try {
    const r = await fetch("CLINIC/api/predict", {method: "POST", body: form, ...init});
    outcomes[name] = r.type + " " + r.status;
  } catch (e) { outcomes[name] = "blocked"; }
}
function submitForm() {
  const dt = new DataTransfer();
  dt.items.add(file);
  document.getElementById("i").files = dt.files;
  document.getElementById("f").submit();
}
(async () => {
  await attempt("no-cors", {mode: "no-cors"});
  await attempt("cors with the page header", {headers: {"X-Privmed-Clinic": "1"}});
  window.fetched = true;
})();
</script></body></html>"""


@contextmanager
def _evil_site(clinic_url: str, png: bytes) -> Iterator[str]:
    """A page on another origin (another loopback port) that tries to make the clinic
    predict: a no-cors fetch, a CORS fetch with the page's header, a multipart form."""
    page = (_EVIL_PAGE.replace("CLINIC", clinic_url)
            .replace("PNG", base64.b64encode(png).decode()).encode())

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@needs_browser
@pytest.mark.slow
def test_another_site_cannot_make_the_clinic_predict_in_a_real_browser(
        clinic_url, he_server, browser, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    png = _write_png(tmp_path / "scan.png", [1, 28, 28], 3).read_bytes()
    before = predictions_logged(he_server.log_path)
    with _evil_site(clinic_url, png) as evil_url:
        browser.get(evil_url)
        WebDriverWait(browser, 60).until(lambda d: d.execute_script("return window.fetched"))
        outcomes = browser.execute_script("return window.outcomes")
        assert outcomes["cors with the page header"] == "blocked", outcomes  # no preflight
        browser.execute_script("submitForm()")
        WebDriverWait(browser, 60).until(lambda d: d.current_url.startswith(clinic_url))
        assert "refused" in browser.page_source
    assert predictions_logged(he_server.log_path) == before  # the hospital computed nothing


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "example.org", "::"])
def test_clinic_refuses_non_loopback_host(host):
    with pytest.raises(ConfigError, match="this computer only"):
        run_clinic("http://127.0.0.1:1", host=host)


def test_uploaded_images_match_model_input(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    data = (tmp_path / "colour.png").read_bytes()
    grey = image_from_bytes(data, "colour.png", (1, 28, 28))
    assert grey.shape == (1, 28, 28) and grey.dtype == np.float32
    assert 0.0 <= grey.min() <= grey.max() <= 1.0
    colour = load_image_for_model(tmp_path / "colour.png", (3, 40, 60))
    np.testing.assert_allclose(colour, rgb.transpose(2, 0, 1) / 255.0, atol=1e-6)
    with pytest.raises(DataError, match="scan.gif"):
        image_from_bytes(data, "scan.gif", (1, 28, 28))
    with pytest.raises(DataError, match="cut.png"):
        image_from_bytes(data[:100], "cut.png", (1, 28, 28))
    dicom = Path(get_testdata_file("CT_small.dcm"))  # an extensionless upload is sniffed
    from_disk = load_image_for_model(dicom, (3, 28, 28))
    np.testing.assert_array_equal(image_from_bytes(dicom.read_bytes(), "scan", (3, 28, 28)),
                                  from_disk)
    assert np.array_equal(from_disk[0], from_disk[2])  # grey repeated to three channels
