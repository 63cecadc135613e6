"""``privmed infer --json/--csv``: the decrypted decisions in a form scripts can read.

One record per image: the file, the decision, the positive class and threshold it was
taken at (binary models with an operating point), the score that decided it and every
class's score (softmax outputs: uncalibrated scores, not probabilities), and the seconds
the round trip took.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from privmed.errors import ConfigError
from privmed.fileio import write_private_bytes


def epsilon_text(card: dict[str, Any]) -> str:
    """``ε = 2.99, δ = 1e-05`` for a DP model (rounded for people: the card keeps the
    exact figure), ``none (no DP)`` otherwise."""
    eps = card.get("epsilon")
    if eps is None or not math.isfinite(eps):
        return "none (no DP)"
    delta = card.get("delta")
    return f"{eps:.2f}" + (f", δ = {delta:.2g}" if delta is not None else "")


def prediction_records(images: Sequence[Path], preds: Sequence[Any],
                       class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One dict per image, in the order given."""
    records = []
    for path, p in zip(images, preds, strict=True):
        scores = list(getattr(p, "scores", None) or p.probabilities)
        records.append({
            "image": str(path), "decision": p.label, "class_index": p.class_index,
            "positive_class": getattr(p, "positive_class", None),
            "threshold": getattr(p, "threshold", None),
            "score": float(getattr(p, "score", p.probability)),
            "scores": {name: float(s) for name, s in zip(class_names, scores, strict=True)},
            "seconds": round(float(p.seconds), 4)})
    return records


def to_json(records: list[dict[str, Any]]) -> str:
    return json.dumps({"predictions": records,
                       "note": "scores are softmax outputs of the model: uncalibrated scores, "
                               "not probabilities"}, indent=2, ensure_ascii=False) + "\n"


def to_csv(records: list[dict[str, Any]], class_names: Sequence[str]) -> str:
    buf = io.StringIO()
    columns = ["image", "decision", "positive_class", "threshold", "score",
               *(f"score_{c}" for c in class_names), "seconds"]
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in records:
        row = {k: r[k] for k in ("image", "decision", "positive_class", "threshold", "score",
                                 "seconds")}
        row.update({f"score_{c}": r["scores"][c] for c in class_names})
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


def write_output(text: str, dest: str, stdout: Any) -> None:
    """``dest`` '-' is standard output, anything else a file (never a folder)."""
    if dest == "-":
        stdout.write(text)
        stdout.flush()
        return
    path = Path(dest).expanduser()
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give a file name for the output.")
    try:  # 0600: decisions about the clinic's patients, by file name
        write_private_bytes(path, text.encode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"Could not write {path}: {exc.strerror or exc}.") from None
