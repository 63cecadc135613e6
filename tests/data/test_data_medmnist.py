"""MedMNIST .npz loading/saving and the MD5-checked download (against a local HTTP server)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from privmed.data import DataBundle, ImageDataset, fetch_medmnist, load_medmnist_npz, save_npz
from privmed.data.medmnist import cached_medmnist_path
from privmed.errors import ConfigError, DataError, NetworkError

REAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "pneumoniamnist.npz"


def _grey(n: int, seed: int = 0, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, size, size), dtype=np.uint8),
            rng.integers(0, 2, (n, 1), dtype=np.uint8))


def _write(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _official(path: Path) -> Path:
    tr, trl = _grey(20, 0)
    va, val = _grey(6, 1)
    te, tel = _grey(8, 2)
    return _write(path, train_images=tr, train_labels=trl, val_images=va, val_labels=val,
                  test_images=te, test_labels=tel)


def test_official_layout_loads_with_known_names(tmp_path: Path) -> None:
    bundle = load_medmnist_npz(_official(tmp_path / "pneumoniamnist.npz"))
    assert bundle.class_names == ("normal", "pneumonia")
    assert [len(s) for s in bundle.splits().values()] == [20, 6, 8]
    assert bundle.train.image_shape == (1, 8, 8)
    raw = np.load(tmp_path / "pneumoniamnist.npz")
    np.testing.assert_array_equal(bundle.train.to_uint8(), raw["train_images"])
    np.testing.assert_array_equal(bundle.val.labels.numpy(), raw["val_labels"][:, 0])


def test_unknown_file_gets_generic_class_names(tmp_path: Path) -> None:
    imgs, _ = _grey(6)
    path = _write(tmp_path / "mystery.npz", train_images=imgs,
                  train_labels=np.array([[0], [1], [2], [0], [1], [2]]))
    bundle = load_medmnist_npz(path)
    assert bundle.class_names == ("class_0", "class_1", "class_2")
    assert bundle.val is None and bundle.test is None


def test_save_load_round_trip_is_exact_grey_and_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    for shape in [(12, 9, 9), (12, 9, 9, 3)]:
        imgs = rng.integers(0, 256, shape, dtype=np.uint8)
        labels = rng.integers(0, 3, 12)
        ds = ImageDataset.from_uint8(imgs, labels, ("a", "b", "c"), "x/train")
        bundle = DataBundle(ds, ds.subset([0, 1, 2]), None, source="mem")
        out = save_npz(bundle, tmp_path / f"rt{len(shape)}.npz")
        back = load_medmnist_npz(out)
        assert back.class_names == ("a", "b", "c")
        assert back.train.dataset_id == ds.dataset_id
        np.testing.assert_array_equal(back.train.to_uint8(), imgs)
        assert back.val is not None and back.val.dataset_id == bundle.val.dataset_id
        assert back.test is None
        raw = np.load(out)
        assert raw["train_labels"].shape == (12, 1) and raw["train_images"].dtype == np.uint8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rt3.npz", "rt4.npz"]  # no temp files


def test_save_overwrites_atomically_and_adds_suffix(tmp_path: Path) -> None:
    imgs, labels = _grey(4)
    bundle = DataBundle(ImageDataset.from_uint8(imgs, labels, ("n", "p")))
    first = save_npz(bundle, tmp_path / "sub" / "data")
    assert first == tmp_path / "sub" / "data.npz"
    second = save_npz(bundle, first)
    assert second == first and load_medmnist_npz(first).train.dataset_id == bundle.train.dataset_id
    assert [p.name for p in first.parent.iterdir()] == ["data.npz"]


@pytest.mark.parametrize("cut", [0.3, 0.9])
def test_truncated_npz_names_file(tmp_path: Path, cut: float) -> None:
    good = _official(tmp_path / "good.npz").read_bytes()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(good[: int(len(good) * cut)])
    with pytest.raises(DataError, match="bad.npz"):
        load_medmnist_npz(bad)


def test_garbage_file_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "junk.npz"
    bad.write_bytes(b"this is not a zip archive at all" * 10)
    with pytest.raises(DataError, match="junk.npz"):
        load_medmnist_npz(bad)


def test_single_npy_array_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "array.npz"
    with bad.open("wb") as fh:
        np.save(fh, np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"array.npz holds a single array"):
        load_medmnist_npz(bad)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothere.npz"):
        load_medmnist_npz(tmp_path / "nothere.npz")


def test_missing_train_keys(tmp_path: Path) -> None:
    imgs, labels = _grey(5)
    path = _write(tmp_path / "nokeys.npz", test_images=imgs, test_labels=labels)
    with pytest.raises(DataError, match=r"nokeys.npz.*train_images"):
        load_medmnist_npz(path)


def test_image_label_count_mismatch(tmp_path: Path) -> None:
    imgs, labels = _grey(5)
    path = _write(tmp_path / "mismatch.npz", train_images=imgs, train_labels=labels[:4])
    with pytest.raises(DataError, match=r"mismatch.npz.*5 images but 4 labels"):
        load_medmnist_npz(path)


def test_label_out_of_range(tmp_path: Path) -> None:
    imgs, _ = _grey(4)
    labels = np.array([[0], [1], [5], [1]])
    path = _write(tmp_path / "range.npz", train_images=imgs, train_labels=labels,
                  class_names=np.array(["a", "b"]))
    with pytest.raises(DataError, match=r"range.npz.*label 5"):
        load_medmnist_npz(path)
    with pytest.raises(DataError, match=r"range.npz.*label 5"):
        load_medmnist_npz(_write(tmp_path / "range.npz", train_images=imgs, train_labels=labels),
                          class_names=["x", "y"])
    known = _write(tmp_path / "pneumoniamnist_bad.npz", train_images=imgs, train_labels=labels)
    with pytest.raises(DataError, match=r"pneumoniamnist_bad.npz.*label 5.*'normal'"):
        load_medmnist_npz(known)
    with pytest.raises(DataError, match="negative label"):
        load_medmnist_npz(_write(tmp_path / "neg.npz", train_images=imgs,
                                 train_labels=-labels))


def test_nan_in_float_arrays(tmp_path: Path) -> None:
    imgs = np.random.default_rng(0).random((4, 6, 6)).astype(np.float32)
    labels = np.array([[0], [1], [0], [1]])
    ok = load_medmnist_npz(_write(tmp_path / "float.npz", train_images=imgs,
                                  train_labels=labels))
    np.testing.assert_allclose(ok.train.images[:, 0].numpy(), imgs, atol=1e-6)
    imgs[2, 3, 3] = np.nan
    with pytest.raises(DataError, match=r"nanimg.npz.*NaN"):
        load_medmnist_npz(_write(tmp_path / "nanimg.npz", train_images=imgs,
                                 train_labels=labels))
    with pytest.raises(DataError, match=r"nanlab.npz.*NaN"):
        load_medmnist_npz(_write(tmp_path / "nanlab.npz", train_images=ok.train.to_uint8(),
                                 train_labels=np.array([[0.0], [np.nan], [1.0], [0.0]])))


def test_bad_shapes(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"shape.npz.*shape"):
        load_medmnist_npz(_write(tmp_path / "shape.npz", train_images=np.zeros((4, 8)),
                                 train_labels=np.zeros((4, 1))))
    with pytest.raises(DataError, match=r"multi.npz.*multi-label"):
        load_medmnist_npz(_write(tmp_path / "multi.npz", train_images=np.zeros((4, 8, 8)),
                                 train_labels=np.zeros((4, 14))))


def test_real_pneumoniamnist() -> None:
    if not REAL.is_file():
        pytest.skip(f"shared PneumoniaMNIST file not found at {REAL.resolve()}")
    bundle = load_medmnist_npz(REAL)
    assert [len(s) for s in bundle.splits().values()] == [4708, 524, 624]
    assert bundle.train.image_shape == (1, 28, 28)
    assert bundle.class_names == ("normal", "pneumonia")
    assert bundle.train.class_counts() == [1214, 3494]
    assert bundle.test.class_counts() == [234, 390]
    assert float(bundle.train.images.min()) >= 0.0 and float(bundle.train.images.max()) <= 1.0


# ----------------------------------------------------------------------------- download


class _Handler(http.server.SimpleHTTPRequestHandler):
    hits: list[str]

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self.hits.append(self.path)
        super().do_GET()


@pytest.fixture()
def server(tmp_path: Path):
    root = tmp_path / "www"
    root.mkdir()
    hits: list[str] = []
    handler = functools.partial(type("H", (_Handler,), {"hits": hits}), directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,),
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root, hits
    httpd.shutdown()
    httpd.server_close()


def test_fetch_downloads_verifies_and_caches(server, tmp_path: Path) -> None:
    base, root, hits = server
    payload = _official(root / "pneumoniamnist.npz").read_bytes()
    md5 = hashlib.md5(payload).hexdigest()
    cache = tmp_path / "cache"
    url = f"{base}/pneumoniamnist.npz"
    got = fetch_medmnist("pneumoniamnist", cache_dir=cache, url=url, md5=md5, progress=True)
    assert got == cached_medmnist_path("pneumoniamnist", 28, cache)
    assert got.read_bytes() == payload and len(hits) == 1
    assert load_medmnist_npz(got).class_names == ("normal", "pneumonia")
    again = fetch_medmnist("pneumoniamnist", cache_dir=cache, url=url, md5=md5, progress=False)
    assert again == got and len(hits) == 1  # cache hit: no second request
    assert [p.name for p in got.parent.iterdir()] == ["pneumoniamnist.npz"]


def test_fetch_md5_mismatch_removes_file(server, tmp_path: Path) -> None:
    base, root, hits = server
    _official(root / "pneumoniamnist.npz")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="MD5"):
        fetch_medmnist("pneumoniamnist", cache_dir=cache, url=f"{base}/pneumoniamnist.npz",
                       md5="0" * 32, progress=False)
    assert len(hits) == 1
    assert not any((cache / "medmnist").iterdir())  # neither the download nor a temp file


def test_fetch_mirror_env_uses_published_md5(server, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    base, root, hits = server
    _official(root / "pneumoniamnist.npz")  # not the official bytes -> published MD5 fails
    monkeypatch.setenv("PRIVMED_MEDMNIST_MIRROR", base)
    monkeypatch.setenv("PRIVMED_CACHE", str(tmp_path / "envcache"))
    with pytest.raises(DataError, match="28209eda62fecd6e6a2d98b1501bb15f"):
        fetch_medmnist("pneumoniamnist", progress=False)
    assert hits == ["/pneumoniamnist.npz"]


def test_fetch_http_error_and_offline(server, tmp_path: Path) -> None:
    base, _, _ = server
    with pytest.raises(NetworkError, match="HTTP 404"):
        fetch_medmnist("pneumoniamnist", cache_dir=tmp_path, url=f"{base}/missing.npz",
                       progress=False)
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(NetworkError, match=r"Could not download pneumoniamnist.*by hand"):
        fetch_medmnist("pneumoniamnist", cache_dir=tmp_path,
                       url=f"http://127.0.0.1:{port}/pneumoniamnist.npz", progress=False,
                       timeout=5)
    assert not any((tmp_path / "medmnist").iterdir())


def test_fetch_unknown_dataset_or_size(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Unknown MedMNIST"):
        fetch_medmnist("nosuchmnist", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="sizes"):
        fetch_medmnist("pneumoniamnist", size=32, cache_dir=tmp_path)


def test_loaded_tensors_are_float32_in_unit_range(tmp_path: Path) -> None:
    bundle = load_medmnist_npz(_official(tmp_path / "x.npz"))
    assert bundle.train.images.dtype == torch.float32
    assert bundle.train.labels.dtype == torch.int64
