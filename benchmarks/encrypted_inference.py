"""End-to-end encrypted inference (CKKS): latency, throughput, bytes, keys and agreement.

    .venv/bin/python benchmarks/encrypted_inference.py            # trains he-cnn, ~10 min
    .venv/bin/python benchmarks/encrypted_inference.py --quick    # 50 single-encoding images
    .venv/bin/python benchmarks/encrypted_inference.py --model runs/he/model.pt --json he.json

Trains an ``he-cnn`` on PneumoniaMNIST (or takes ``--model``), compiles it, starts a real
``privmed serve`` process on loopback and measures it through ``EncryptedClient``: the
single encoding (one ciphertext per image, per-request latency) and the batch encoding
(one ciphertext per pixel, 4096 images per request: the throughput figure). Encrypted
scores are compared with the plaintext forward pass on every test image.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist.npz"
MB = 1e6


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _auc(labels: np.ndarray, logits: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, _softmax(logits)[:, 1]))


def _train(args: argparse.Namespace, bundle: Any, out: Path) -> Path:
    from privmed.privacy import PrivacyConfig
    from privmed.training import TrainConfig
    from privmed.training.run import train_run

    privacy = None if args.epsilon is None else PrivacyConfig(target_epsilon=args.epsilon)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed)
    start = time.perf_counter()
    res = train_run(bundle, out / "run", model_name="he-cnn", config=config, privacy=privacy,
                    command="benchmark", progress=False, say=lambda s: None)
    eps = res["privacy"]["epsilon"] if res["privacy"]["enabled"] else None
    print(f"trained he-cnn in {time.perf_counter() - start:.0f} s: test ROC-AUC "
          f"{res['metrics']['test']['roc_auc']:.4f}, ε = {eps if eps is None else f'{eps:.2f}'}",
          flush=True)
    return out / "run" / "model.pt"


@contextmanager
def _server(artefact: Path, log_path: Path) -> Iterator[str]:
    """``privmed serve ARTEFACT`` in its own process; yields its URL, stops it afterwards."""
    from privmed.encrypted.server import start_server_process, stop_process

    proc, url = start_server_process(artefact, log_path, timeout=120)
    try:
        yield url
    finally:
        stop_process(proc)


def _agreement(enc: np.ndarray, plain: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"images": len(enc), "same_decisions": float((enc.argmax(1) == plain.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(enc - plain).max()),
            "plain_auc": _auc(labels, plain), "encrypted_auc": _auc(labels, enc)}


def measure(args: argparse.Namespace, url: str, images: np.ndarray, labels: np.ndarray,
            plain: np.ndarray) -> dict[str, Any]:
    from privmed.encrypted.client import EncryptedClient

    n_agree = min(len(images), 50 if args.quick else len(images))
    n_single = min(len(images), args.single)
    fig: dict[str, Any] = {}
    with EncryptedClient(url) as client:
        client.logits_single(images[0])  # warm-up: opens the session (uploads the context)
        sizes = client.context_bytes  # the keys actually sent, not a second key generation
        fig["keys"] = {"relin_MB": sizes["relin_keys"] / MB,
                       "galois_MB": sizes["galois_keys"] / MB,
                       "evaluation_context_MB": sum(sizes.values()) / MB,
                       "secret_key_MB": len(client.keys.secret_key_bytes()) / MB}
        fig["keys"]["context_upload_MB"] = client.bytes_up / MB

        # single encoding: one request per image; timings from the first n_single
        rows, times = [], []
        for i in range(max(n_single, n_agree)):
            up, down = client.bytes_up, client.bytes_down
            logits, t = client.logits_single(images[i])
            rows.append(logits)
            times.append({**t, "bytes_up": client.bytes_up - up,
                          "bytes_down": client.bytes_down - down})
            if (i + 1) % 100 == 0:
                print(f"  single encoding: {i + 1} images", flush=True)
        single = {k: statistics.median(t[k] for t in times[:n_single])
                  for k in ("encrypt", "server", "decrypt", "total", "upload_bytes",
                            "bytes_up", "bytes_down")}
        fig["single"] = {"images": n_single, **single}
        fig["single_agreement"] = _agreement(np.stack(rows[:n_agree]), plain[:n_agree],
                                             labels[:n_agree])

        # batch encoding: the 624 test images, then one full request of 4096
        slots = client.params.slots
        up = client.bytes_up
        start = time.perf_counter()
        enc = client.logits_batch(images)
        wall = time.perf_counter() - start
        fig["batch_test"] = {"images": len(images), "wall_s": wall,
                             "images_per_s": len(images) / wall,
                             "upload_bytes_per_image": (client.bytes_up - up) / len(images)}
        fig["batch_agreement"] = _agreement(enc, plain, labels)
        full = np.resize(images, (slots, *images.shape[1:]))
        up, down = client.bytes_up, client.bytes_down
        start = time.perf_counter()
        enc_full = client.logits_batch(full)
        wall = time.perf_counter() - start
        fig["batch_full"] = {"images": slots, "wall_s": wall, "images_per_s": slots / wall,
                             "upload_bytes_per_image": (client.bytes_up - up) / slots,
                             "upload_MB": (client.bytes_up - up) / MB,
                             "download_MB": (client.bytes_down - down) / MB,
                             "same_as_624_batch": float(np.abs(
                                 enc_full[:len(images)] - enc).max())}
    return fig


def _table(fig: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    s, bf, k = fig["single"], fig["batch_full"], fig["keys"]
    rows = [("single-image latency, end to end (median)", f"{s['total']:.3f} s", "≤ 0.5 s",
             s["total"] <= 0.5),
            ("batched throughput (4096 images / request)", f"{bf['images_per_s']:.0f} img/s",
             "≥ 200 img/s", bf["images_per_s"] >= 200),
            ("batched upload per image (4096 / request)",
             f"{bf['upload_bytes_per_image'] / 1e3:.1f} kB", "≤ 100 kB",
             bf["upload_bytes_per_image"] <= 100e3),
            ("evaluation context (relin + Galois keys)", f"{k['evaluation_context_MB']:.2f} MB",
             "≤ 20 MB", k["evaluation_context_MB"] <= 20)]
    for enc in ("single", "batch"):
        a = fig[f"{enc}_agreement"]
        rows.append((f"same decisions, {enc} encoding ({a['images']} images)",
                     f"{a['same_decisions']:.2%}", "100%", a["same_decisions"] == 1.0))
        rows.append((f"ROC-AUC encrypted vs plaintext, {enc} ({a['images']} images)",
                     f"{a['encrypted_auc']:.4f} vs {a['plain_auc']:.4f} "
                     f"(Δ {a['encrypted_auc'] - a['plain_auc']:+.1e})", "equal to 4 d.p.",
                     round(a["encrypted_auc"], 4) == round(a["plain_auc"], 4)))
    return rows


def report(fig: dict[str, Any]) -> None:
    s, k, bt, bf = fig["single"], fig["keys"], fig["batch_test"], fig["batch_full"]
    print(f"\nCKKS: {fig['ckks']}; output scale {fig['output_scale']:g}")
    print(f"plaintext: HEModel vs torch max |logit diff| {fig['plain_vs_torch']:.2e}; test "
          f"ROC-AUC {fig['plain_auc']:.6f} (HEModel) vs {fig['torch_auc']:.6f} (torch)")
    print(f"\nsingle encoding, median over {s['images']} test images: encrypt "
          f"{s['encrypt'] * 1e3:.1f} ms, server compute {s['server'] * 1e3:.1f} ms, decrypt "
          f"{s['decrypt'] * 1e3:.1f} ms, total {s['total'] * 1e3:.1f} ms; up "
          f"{s['bytes_up'] / 1e3:.1f} kB/image (ciphertext {s['upload_bytes'] / 1e3:.1f} kB), "
          f"down {s['bytes_down'] / 1e3:.1f} kB")
    print(f"batch encoding, {bt['images']} test images in one request: {bt['wall_s']:.1f} s, "
          f"{bt['images_per_s']:.0f} img/s, {bt['upload_bytes_per_image'] / 1e3:.1f} kB up/image")
    print(f"batch encoding, {bf['images']} images (a full request; a request costs the same "
          f"for 1..{bf['images']} images): {bf['wall_s']:.1f} s, {bf['images_per_s']:.0f} "
          f"img/s, {bf['upload_MB']:.1f} MB up ({bf['upload_bytes_per_image'] / 1e3:.1f} kB/"
          f"image), {bf['download_MB']:.2f} MB down")
    print(f"keys: relin {k['relin_MB']:.2f} MB + Galois {k['galois_MB']:.2f} MB = evaluation "
          f"context {k['evaluation_context_MB']:.2f} MB (uploaded once per session: "
          f"{k['context_upload_MB']:.2f} MB); secret key {k['secret_key_MB']:.2f} MB (never "
          "sent)")
    for enc in ("single", "batch"):
        a = fig[f"{enc}_agreement"]
        print(f"{enc} encoding vs plaintext on {a['images']} images: same decisions "
              f"{a['same_decisions']:.2%}, max |logit diff| {a['max_abs_logit_diff']:.2e}, "
              f"ROC-AUC {a['encrypted_auc']:.6f} encrypted vs {a['plain_auc']:.6f} plaintext")
    print("\n| figure | measured | target | met? |\n|---|---:|---|---|")
    for name, measured, target, met in fig["table"]:
        print(f"| {name} | {measured} | {target} | {'yes' if met else 'NO'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--model", type=Path, help="A trained he-cnn model.pt (skips training).")
    parser.add_argument("--out", type=Path, help="Keep the run, artefact and server log here.")
    parser.add_argument("--epsilon", type=float, help="Train with DP-SGD at this epsilon.")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--single", type=int, default=20, help="Images for single latency.")
    parser.add_argument("--quick", action="store_true",
                        help="Single-encoding agreement on 50 images instead of all.")
    parser.add_argument("--json", type=Path, help="Write the figures here.")
    args = parser.parse_args()
    if not Path(args.data).exists():
        sys.exit(f"Skipped: {args.data} is absent.")

    import torch

    from privmed.data import load_data
    from privmed.encrypted.calibration import SYNTHETIC, synthetic_images
    from privmed.encrypted.compiler import compile_model
    from privmed.models import load_model

    bundle = load_data(args.data)
    out = args.out or Path(tempfile.mkdtemp(prefix="privmed-he-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        model_path = args.model or _train(args, bundle, out)
        net, info = load_model(model_path)
        # calibrated on synthetic images, as 'privmed encrypted compile' does by default
        he, _ = compile_model(net, info, synthetic_images(tuple(info["image_shape"])),
                              source=SYNTHETIC)
        artefact = he.save(out / "model.he")
        images = bundle.test.images.numpy()
        labels = bundle.test.labels.numpy()
        plain = he.plain_logits(images)
        with torch.no_grad():
            torch_logits = net(bundle.test.images).double().numpy()
        fig: dict[str, Any] = {"model": str(model_path), "ckks": he.params.to_dict(),
                               "output_scale": he.output_scale,
                               "plain_vs_torch": float(np.abs(plain - torch_logits).max()),
                               "plain_auc": _auc(labels, plain),
                               "torch_auc": _auc(labels, torch_logits)}
        with _server(artefact, out / "serve.log") as url:
            fig.update(measure(args, url, images, labels, plain))
        fig["table"] = _table(fig)
        report(fig)
        if args.json:
            args.json.write_text(json.dumps(fig, indent=2, default=str))
            print(f"\nWrote {args.json}")
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
