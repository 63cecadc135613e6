"""What a run's (ε, δ) protects, said plainly: the unit (a patient when the data names the
patients, else one image), what a per-image guarantee gives a patient with several images,
and the settings that weaken it (``privacy.unit``, ``privacy.units``,
``privacy.max_images_per_unit``, ``privacy.group_privacy`` and ``privacy.warnings`` in
results.json)."""

from __future__ import annotations

from typing import Any

from privmed.privacy.checks import dp_warnings
from privmed.privacy.config import PrivacyConfig
from privmed.privacy.group import GROUP_SIZES, group_privacy_table
from privmed.privacy.records import protected_units


def run_warnings(privacy: PrivacyConfig | None, train: Any, batch_size: int) -> list[str]:
    """The sentences to print before a DP run on the ImageDataset ``train`` starts (none
    without DP): δ against the number of protected units, q = 1."""
    if privacy is None:
        return []
    unit, units = protected_units(privacy.unit, train)
    return dp_warnings(len(train), batch_size, privacy.resolved_delta(units, unit))


def group_rows(epsilon: float, delta: float, largest_patient: int | None = None
               ) -> list[dict[str, Any]]:
    """Group privacy for 2, 5 and 10 images, plus the largest training patient's count
    (marked ``largest_patient``) when the patients are known."""
    sizes = set(GROUP_SIZES)
    if largest_patient is not None and largest_patient > 1:
        sizes.add(largest_patient)
    rows = group_privacy_table(epsilon, delta, tuple(sizes))
    for row in rows:
        if row["images"] == largest_patient:
            row["largest_patient"] = True
    return rows


def privacy_unit_record(privacy_record: dict, warnings: list[str],
                        largest_patient: int | None = None) -> dict[str, Any]:
    """The keys a DP run adds to ``privacy`` (nothing for a run without DP)."""
    if not privacy_record.get("enabled") or privacy_record.get("epsilon") is None:
        return {}
    unit = privacy_record.get("unit") or "image"
    if unit == "patient":  # the guarantee already covers all of a patient's images
        return {"unit": unit, "max_images_per_unit": largest_patient, "group_privacy": [],
                "warnings": list(warnings)}
    return {"unit": unit, "max_images_per_unit": 1,
            "group_privacy": group_rows(privacy_record["epsilon"], privacy_record["delta"],
                                        largest_patient),
            "warnings": list(warnings)}


def _pair(row: dict) -> str:
    if row["delta"] >= 1:
        return f"ε = {row['epsilon']:.3g}, δ ≥ 1: no guarantee"
    return f"ε = {row['epsilon']:.3g}, δ = {row['delta']:.2g}"


def privacy_unit_lines(privacy: dict) -> list[str]:
    """Console sentences: the unit and the group-privacy figures (none without DP)."""
    if not privacy.get("enabled") or privacy.get("epsilon") is None:
        return []
    if privacy.get("unit") == "patient":
        most = privacy.get("max_images_per_unit")
        each = f", up to {most} images each" if most else ""
        count = f" ({privacy['units']} patients{each})" if privacy.get("units") else ""
        return [f"ε = {privacy['epsilon']:.3g} per patient{count}: whether or not any one "
                "patient's images were used changes what the model reveals by at most ε "
                f"(δ = {privacy['delta']:.2g})."]
    rows = privacy.get("group_privacy") or group_rows(privacy["epsilon"], privacy["delta"])
    plain = [r for r in rows if r["images"] in GROUP_SIZES]
    lines = ["ε is per image: it protects one training image, not a patient. A patient with "
             "k images is protected only at group privacy (kε, δ_k): "
             + "; ".join(f"{r['images']} images ({_pair(r)})" for r in plain) + "."]
    largest = next((r for r in rows if r.get("largest_patient")), None)
    if largest is not None:
        lines.append(f"The largest training patient here has {largest['images']} images: "
                     f"({_pair(largest)}).")
    return lines


def add_run_notes(results: dict[str, Any], bundle: Any, warnings: list[str]) -> None:
    """Put the privacy unit, group privacy and warnings into ``results["privacy"]``, and the
    patients (when known) into ``results["data"]["patients"]``, in place."""
    from privmed.data.patients import patient_summary

    patients = patient_summary(bundle)
    if patients is not None:
        results["data"]["patients"] = patients
    results["privacy"].update(privacy_unit_record(
        results["privacy"], warnings, bundle.train.max_images_per_patient))
