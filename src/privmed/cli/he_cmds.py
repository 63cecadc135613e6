"""``privmed encrypted compile``, ``privmed serve``, ``privmed infer``, ``privmed clinic``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from privmed.cli.app import app, console, encrypted_app

ServerOpt = Annotated[str, typer.Option("--server", help="Base URL of a 'privmed serve' server, "
                                        "e.g. http://127.0.0.1:8765.")]


@encrypted_app.command("compile")
def compile_cmd(
    model: Annotated[Path, typer.Argument(help="Trained model.pt (or its run folder).")],
    data: Annotated[str, typer.Option("--data", help="The model's own data ('synthetic', a "
                                      ".npz, a folder): its test images run the local "
                                      "--check; it calibrates only with --calibration "
                                      "private.")],
    out: Annotated[Path | None, typer.Option("--out", help="Artefact to write (default: "
                                             "MODEL with suffix .he).")] = None,
    calibration: Annotated[str, typer.Option("--calibration", help="Images that set the "
                                             "value ranges and the published output scale: "
                                             "'synthetic' (no patient data), 'public:DATA' "
                                             "(a public data set) or 'private' (the --data "
                                             "training images; the public card then says "
                                             "its output scale depends on them outside "
                                             "DP).")] = "synthetic",
    calibration_images: Annotated[int, typer.Option("--calibration-images")] = 2000,
    check: Annotated[int, typer.Option("--check", help="Images to run encrypted as a final "
                                       "check (0 skips).")] = 4,
) -> None:
    """Check MODEL runs on CKKS ciphertexts, choose parameters, write a servable artefact."""
    from privmed.encrypted.artefact import compile_encrypted

    report = compile_encrypted(model, data, out, calibration=calibration,
                               calibration_images=calibration_images, check=check)
    source = report["calibration"]
    table = Table("stage", "max |value| on calibration", "CKKS limit",
                  title=f"Value ranges (calibration: {source}; the card shows limits only)")
    for stage, r in report["ranges"].items():
        table.add_row(stage, f"{r['max']:.4g}", f"{r['limit']:.3g}")
    console.print(table)
    p = report["ckks"]
    console.print(f"CKKS: ring degree {p['poly_modulus_degree']}, primes "
                  f"{p['coeff_modulus_bits']} bits, scale 2^{p['scale_bits']}, depth "
                  f"{p['depth']}, 128-bit security; output scale {report['output_scale']:g}.")
    result = report["check"]
    if result is not None:
        console.print(f"Encrypted check on {int(result['images'])} images: same decision on "
                      f"{result['same_decisions']:.0%}, largest logit error "
                      f"{result['max_abs_error']:.2e}.")
    path = report["path"]
    console.print(f"Wrote [bold]{path}[/]: serve it with 'privmed serve {path}'.")


@app.command("serve")
def serve_cmd(
    model: Annotated[Path, typer.Argument(help="Compiled model (.he) from 'privmed encrypted "
                                          "compile'.")],
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8765,
    session_ttl: Annotated[float, typer.Option("--session-ttl", help="Seconds an idle "
                                               "session's keys are kept.")] = 1800.0,
    max_sessions: Annotated[int, typer.Option("--max-sessions")] = 16,
    max_images: Annotated[int, typer.Option("--max-images-per-session", help="Rate limit "
                                            "against model extraction: images computed per "
                                            "session (4096 per batch request).")] = 100_000,
    max_inflight_mb: Annotated[int, typer.Option("--max-inflight-mb", help="Request bodies "
                                                 "the server receives at once, all clients "
                                                 "together (MiB; beyond: HTTP 503).")] = 512,
) -> None:
    """Serve encrypted inference: clients send ciphertexts, get encrypted scores back."""
    from privmed.encrypted.server import ServerLimits, serve_encrypted

    serve_encrypted(model, host=host, port=port,
                    limits=ServerLimits(session_ttl_s=session_ttl, max_sessions=max_sessions,
                                        max_images_per_session=max_images,
                                        max_inflight_bytes=max_inflight_mb << 20),
                    say=lambda line: console.print(line, highlight=False))


@app.command("infer")
def infer_cmd(
    images: Annotated[list[Path], typer.Argument(help="PNG, JPEG or DICOM files.")],
    server: ServerOpt = "http://127.0.0.1:8765",
    batch: Annotated[bool, typer.Option("--batch", help="Pack up to 4096 images per request "
                                        "(throughput) instead of one per request.")] = False,
    json_out: Annotated[str | None, typer.Option(
        "--json", help="Also write the decisions as JSON to this file ('-': standard output, "
        "the table then goes to standard error).")] = None,
    csv_out: Annotated[str | None, typer.Option(
        "--csv", help="Also write the decisions as CSV (one row per image) to this file "
        "('-': standard output).")] = None,
) -> None:
    """Encrypt images here, have the server classify them encrypted, decrypt the scores."""
    import sys

    from rich.progress import Progress

    from privmed.cli.app import console as screen
    from privmed.cli.app import err_console
    from privmed.encrypted import predictions_out as out
    from privmed.encrypted.client import EncryptedClient, infer_encrypted
    from privmed.encrypted.validated import decision_rule, performance_text
    from privmed.errors import ConfigError

    if json_out == "-" and csv_out == "-":
        raise ConfigError("Only one of --json and --csv can go to standard output ('-').")
    # With '-' the table and notes go to stderr, so that stdout stays parseable.
    console = err_console if "-" in (json_out, csv_out) else screen
    with EncryptedClient(server) as client:
        console.print(f"Model {client.card.get('model')} trained at ε = "
                      f"{out.epsilon_text(client.card)}; keys stay on this machine.",
                      highlight=False)
        console.print(f"Decision: {decision_rule(client.card)}. "
                      f"{performance_text(client.card)}", highlight=False)
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"Encrypted {'batch ' if batch else ''}inference",
                                total=len(images))
            preds = infer_encrypted(images, client, batch=batch,
                                    progress=lambda n: bar.advance(task, n))
        positive = preds[0].positive_class if preds else None
        table = Table("image", "decision", f"score for {positive}" if positive
                      else "score (top class)", "seconds", caption="Scores are uncalibrated "
                      "model outputs, not probabilities.")
        for path, p in zip(images, preds, strict=True):
            table.add_row(str(path), p.label, f"{p.score:.3f}", f"{p.seconds:.3f}")
        console.print(table)
        records = out.prediction_records(images, preds, client.class_names)
        if json_out is not None:
            out.write_output(out.to_json(records), json_out, sys.stdout)
        if csv_out is not None:
            out.write_output(out.to_csv(records, client.class_names), csv_out, sys.stdout)


@app.command("clinic")
def clinic_cmd(
    server: ServerOpt = "http://127.0.0.1:8765",
    host: Annotated[str, typer.Option("--host", help="Loopback address only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8766,
) -> None:
    """A local web page for the clinic: drop an image, see the encrypted diagnosis."""
    from privmed.encrypted.clinic import run_clinic

    console.print(f"Starting the clinic page on http://{host}:{port} (images are encrypted here "
                  f"before anything is sent to {server}).")
    run_clinic(server, host=host, port=port)


def demo_encrypted(bundle, out: Path) -> dict:
    """Demo step: DP-train he-cnn, compile it, serve it from a real process on loopback,
    classify the test images encrypted (single and batch) and compare with plaintext."""
    import time

    import numpy as np
    from sklearn.metrics import roc_auc_score

    from privmed.encrypted.calibration import SYNTHETIC, synthetic_images
    from privmed.encrypted.client import EncryptedClient
    from privmed.encrypted.compiler import compile_model
    from privmed.encrypted.server import start_server_process, stop_process
    from privmed.models import load_model
    from privmed.privacy import PrivacyConfig
    from privmed.training import TrainConfig
    from privmed.training.run import train_run

    results = train_run(bundle, out, model_name="he-cnn", progress=False,
                        config=TrainConfig(epochs=15, batch_size=256, lr=3e-2),
                        privacy=PrivacyConfig(target_epsilon=3.0), command="privmed demo")
    net, info = load_model(out / "model.pt")
    he, _ = compile_model(net, info, synthetic_images(tuple(info["image_shape"])),
                          source=SYNTHETIC)
    artefact = he.save(out / "model.he")
    server, url = start_server_process(artefact, out / "serve.log")
    try:
        images = bundle.test.images.numpy()
        labels = bundle.test.labels.numpy()
        with EncryptedClient(url) as client:
            singles = [client.predict(img) for img in images[:5]]
            start = time.perf_counter()
            enc = client.logits_batch(images)
            batch_s = time.perf_counter() - start
            context_mb = sum(client.context_bytes.values()) / 1e6
        plain = he.plain_logits(images)
    finally:
        stop_process(server)
    prob = lambda z: np.exp(z[:, 1]) / np.exp(z).sum(1)  # noqa: E731
    summary = {
        "epsilon": results["privacy"]["epsilon"],
        "single_s": float(np.median([p.seconds for p in singles])),
        "single_upload_kb": singles[0].timings["upload_bytes"] / 1e3,
        "batch_images_per_s": len(images) / batch_s, "context_mb": context_mb,
        "same_decisions": float((enc.argmax(1) == plain.argmax(1)).mean()),
        "auc_encrypted": float(roc_auc_score(labels, prob(enc))),
        "auc_plain": float(roc_auc_score(labels, prob(plain))),
    }
    console.print(
        f"he-cnn trained at ε = {summary['epsilon']:.2f}, compiled for CKKS (ring 8192, "
        f"128-bit) and served from a separate process. One image: "
        f"{summary['single_s']:.2f} s end to end, {summary['single_upload_kb']:.0f} kB up. "
        f"{len(images)} test images packed in one request: {batch_s:.1f} s. Same decision "
        f"as plaintext on {summary['same_decisions']:.0%}; ROC-AUC encrypted "
        f"{summary['auc_encrypted']:.4f} vs plaintext {summary['auc_plain']:.4f}. The "
        f"server saw {summary['context_mb']:.1f} MB of public keys and ciphertexts only.")
    return summary

