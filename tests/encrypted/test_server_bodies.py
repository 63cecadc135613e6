"""Attacks on request bodies of a real ``privmed serve`` process: concurrent large
uploads (memory), crafted wire headers (HTTP 500s) and a seeded fuzz of both."""

from __future__ import annotations

import contextlib
import json
import os
import random
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from he_http import OCTET, RawSession, is_one_sentence, open_session, proc_status_kib, serving
from procs import wait_until

from privmed.encrypted.wire import MAGIC

MIB = 1 << 20
# Peak resident memory may grow by this much while 900 MiB of bodies arrive at once.
RSS_GROWTH_BOUND_MIB = 128
# a refused upload may also see the connection closed before it has sent everything
REFUSED_UPLOAD = ("RemoteProtocolError", "WriteError", "ReadError")


def _message(header: bytes | str, tail: bytes = b"") -> bytes:
    header = header.encode() if isinstance(header, str) else header
    return MAGIC + struct.pack(">I", len(header)) + header + tail


def _large_head(size: int) -> bytes:
    part = size // 784
    return _message(json.dumps({"kind": "ciphertexts", "meta": {},
                                "parts": [[f"ct{i}", part] for i in range(784)]}))


def _large_length(size: int) -> int:
    return len(_large_head(size)) + size // 784 * 784


def _large_body(size: int, hold: threading.Event | None = None) -> Iterator[bytes]:
    """A ~``size``-byte batch message of 784 junk parts, made on the fly (the test does
    not hold it); waits on ``hold`` after the first MiB if given."""
    yield _large_head(size)
    left, chunk = size // 784 * 784, b"\x01" * MIB
    while left:
        yield chunk[:min(left, MIB)]
        left -= min(left, MIB)
        if hold is not None:
            hold.wait(120)
            hold = None


def _spooled_files(pid: int) -> int:
    """Deleted files ``pid`` holds open: the server spools a body it admitted to one once
    more than 1 MiB of it has arrived (SPOOL_IN_MEMORY)."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).endswith(" (deleted)")
    return count


@pytest.mark.slow
def test_concurrent_large_bodies_are_refused_and_memory_stays_bounded(compiled_he, tmp_path):
    he, artefact = compiled_he
    with serving(artefact, tmp_path, "--max-inflight-mb", "512") as (proc, url):
        sessions = [open_session(url, he.params) for _ in range(3)]  # anyone may open some
        peak_before = proc_status_kib(proc.pid, "VmHWM")
        size = 300 * MIB
        length = str(_large_length(size))
        results: dict[str, object] = {}

        def send(name: str, session: RawSession, hold: threading.Event | None = None) -> None:
            try:
                results[name] = httpx.post(
                    session.predict_url, params={"encoding": "batch"},
                    content=_large_body(size, hold),
                    headers={**OCTET, **session.auth, "Content-Length": length},
                    timeout=300).status_code
            except httpx.TransportError as exc:  # the server may close a refused upload
                results[name] = type(exc).__name__

        release = threading.Event()
        slow = threading.Thread(target=send, args=("slow", sessions[0], release))
        spooled = _spooled_files(proc.pid)
        slow.start()  # takes 300 MiB of the 512 MiB budget, then stalls
        wait_until(lambda: _spooled_files(proc.pid) > spooled, 120,
                   "the server to admit the slow upload (its first MiB spooled to disk)")
        fast = [threading.Thread(target=send, args=(f"fast{i}", sessions[i]))
                for i in range(3)]
        for t in fast:
            t.start()
        for t in fast:
            t.join(300)
        release.set()
        slow.join(300)
        peak_after = proc_status_kib(proc.pid, "VmHWM")
        # the admitted body was spooled to disk and parsed: its junk ciphertexts are refused
        assert results["slow"] == 400, results
        # the same token again: one request at a time per token
        assert results["fast0"] in (429, *REFUSED_UPLOAD), results
        # other tokens: the bodies did not fit the in-flight budget, refused unread
        assert all(results[f"fast{i}"] in (503, *REFUSED_UPLOAD) for i in (1, 2)), results
        assert 503 in results.values(), results
        growth = (peak_after - peak_before) / 1024
        assert growth < RSS_GROWTH_BOUND_MIB, f"peak RSS grew by {growth:.0f} MiB"
        # a body without a length cannot reserve its place in the budget
        chunked = httpx.post(sessions[0].predict_url, content=iter([b"x" * 100]),
                             headers={**OCTET, **sessions[0].auth})
        assert chunked.status_code == 411 and is_one_sentence(chunked)
        assert httpx.get(f"{url}/v1/health").status_code == 200


def _crafted(kind: str) -> list[bytes]:
    """A part length of 1e400 (OverflowError in int()) and 100,000 nested arrays
    (RecursionError in json.loads): both gave HTTP 500."""
    return [_message(f'{{"kind": "{kind}", "meta": {{}}, "parts": [["ct0", 1e400]]}}'),
            _message(b'{"kind": "' + kind.encode() + b'", "meta": ' + b"[" * 100_000
                     + b"]" * 100_000 + b', "parts": []}')]


def test_crafted_wire_headers_get_a_400_not_a_500(he_server):
    session = open_session(he_server.url, he_server.he.params)
    replies = [session.predict(body) for body in _crafted("ciphertexts")]
    replies += [httpx.post(f"{he_server.url}/v1/sessions", content=body, headers=OCTET,
                           timeout=60) for body in _crafted("context")]
    for reply in replies:
        assert reply.status_code == 400 and is_one_sentence(reply), reply.text[:200]
        assert "header" in reply.json()["detail"]


_HEADERS = [
    '{"kind": "ciphertexts", "parts": [["ct0", -1]]}',
    '{"kind": "ciphertexts", "parts": [["ct0", "12"]]}',
    '{"kind": "ciphertexts", "parts": [["ct0", 1.5]]}',
    '{"kind": "ciphertexts", "parts": [["ct0", NaN]]}',
    '{"kind": "ciphertexts", "parts": [["ct0", Infinity]]}',
    '{"kind": "ciphertexts", "parts": [["ct0", -1e400]]}',
    '{"kind": "ciphertexts", "parts": [["ct0", ' + "9" * 5000 + "]]}",
    '{"kind": "ciphertexts", "parts": [["ct0", 100000000000000000000000000000]]}',
    '{"kind": "ciphertexts", "parts": [["ct0", true]]}',
    '{"kind": "ciphertexts", "parts": [[1, 2]]}',
    '{"kind": "ciphertexts", "parts": [["ct0"]]}',
    '{"kind": "ciphertexts", "parts": [["ct0", 1, 2]]}',
    '{"kind": "ciphertexts", "parts": {"ct0": 1}}',
    '{"kind": "ciphertexts", "parts": "ct0"}',
    '{"kind": "ciphertexts", "parts": null}',
    '{"kind": ["ciphertexts"], "parts": []}',
    '{"kind": 5, "parts": []}',
    '{"kind": "' + "k" * 10_000 + '", "parts": []}',
    '{"kind": "ciphertexts", "meta": [], "parts": []}',
    '{"kind": "ciphertexts", "meta": "x", "parts": []}',
    '{"kind": "ciphertexts", "meta": {"a": ' + "[" * 150 + "]" * 150 + '}, "parts": []}',
    '{"kind": "ciphertexts", "parts": [' + ", ".join(['["c", 0]'] * 20_000) + "]}",
    '{"kind": "ciphertexts"}', "[]", "null", '"x"', "{", "", '{"kind": "ciphertexts", "parts": []',
]


def test_a_fuzz_of_malformed_messages_and_headers_gets_no_5xx(he_server, synthetic_bundle):
    url, he = he_server.url, he_server.he
    session = open_session(url, he.params)
    valid = session.single_body(he.layout, synthetic_bundle.test.images[0].numpy())
    rng = random.Random(0)
    bodies = [_message(h) for h in _HEADERS] + [_message(b"\xff\xfe\x00{")]
    bodies += [MAGIC + struct.pack(">I", 0xFFFFFFFF), MAGIC + b"\x00\x00", MAGIC, b"", b"x"]
    for _ in range(40):  # truncations and byte flips of a valid request
        cut = bytearray(valid[:rng.randrange(len(valid))])
        flipped = bytearray(valid)
        for _ in range(rng.randrange(1, 4)):
            flipped[rng.randrange(min(len(valid), 400))] = rng.randrange(256)
        bodies += [bytes(cut), bytes(flipped)]
    replies = [session.predict(b) for b in bodies]
    contexts = [_message(h.replace('"ciphertexts"', '"context"')) for h in _HEADERS]
    replies += [httpx.post(f"{url}/v1/sessions", content=b, headers=OCTET, timeout=60)
                for b in contexts]
    weird_headers = [{"Content-Type": b"application/octet-stream; charset=\xff"},
                     {"Content-Type": "application/OCTET-STREAM"}, {"Content-Type": ""},
                     {"Authorization": "Bearer"}, {"Authorization": "Bearer " + "t" * 8000},
                     {"Authorization": b"\xff\xfe"}, {"Authorization": "Negotiate x y z"}]
    replies += [session.predict(valid, headers=h) for h in weird_headers]
    for params in ({"encoding": "batch", "images": "1e400"}, {"encoding": "Single"},
                   {"encoding": "\u00e9" * 300}, {"encoding": ["single", "batch"]}):
        replies.append(session.predict(valid, **params))
    for sid in ("%00", "..", "x" * 4000, "\u00e9"):
        replies.append(httpx.post(f"{url}/v1/sessions/{sid}/predict", content=valid,
                                  headers={**OCTET, **session.auth}, timeout=60))
    codes = [r.status_code for r in replies]
    assert all(c < 500 for c in codes), sorted(set(codes))
    refused = [r for r in replies if r.status_code >= 400 and r.status_code != 404]
    assert refused and all(is_one_sentence(r) for r in refused), [
        r.text[:120] for r in refused if not is_one_sentence(r)][:5]
    assert session.predict(valid).status_code == 200  # and it keeps serving
