"""The report's statement of what ε protects (a patient, or one image and then what that
gives a patient with several images by group privacy), the patients in the data, and DP
settings that weaken the guarantee (``privacy.unit``, ``privacy.group_privacy``,
``privacy.warnings``, ``data.patients``)."""

from __future__ import annotations

from privmed.report.html import _e, _fmt


def _delta(value: float) -> str:
    return ('<span class="warn">≥ 1: no guarantee</span>' if value >= 1
            else _e(format(value, ".2g")))


def privacy_unit_html(p: dict) -> str:
    """The paragraph and table under the (ε, δ) headline ('' without DP)."""
    from privmed.training.privacy_notes import group_rows

    if not p.get("enabled") or p.get("epsilon") is None or p.get("delta") is None:
        return ""
    notes = list(p.get("warnings") or [])
    if p.get("unit") == "patient":
        most = p.get("max_images_per_unit")
        each = f", up to {_fmt(most)} images each" if most else ""
        count = f", {_fmt(p['units'])} patients{each}" if p.get("units") else ""
        text = (f"<p><strong>Privacy unit: one patient.</strong> ε = {_fmt(p['epsilon'], '.3g')}"
                f" per patient{count}: whether or not any one "
                "patient's images were used for training, what the model reveals changes by "
                "at most ε (with probability 1 − δ). Each DP-SGD step sampled whole patients "
                "and clipped each patient's summed gradient.</p>")
        return text + "".join(f'<p class="warn">{_e(w)}</p>' for w in notes)
    rows = p.get("group_privacy") or group_rows(p["epsilon"], p["delta"])
    body = "".join(
        f"<tr><td class=n>{r['images']}"
        + (" (the largest patient here)" if r.get("largest_patient") else "")
        + f"</td><td class=n>{_fmt(r['epsilon'], '.3g')}</td>"
        f"<td class=n>{_delta(r['delta'])}</td></tr>" for r in rows)
    text = ("<p><strong>Privacy unit: one image.</strong> ε bounds what the model reveals "
            "about any one training image, not about a patient: a patient with k images in "
            "training is protected only at group privacy, (kε, δ·(e<sup>kε</sup> − 1)/"
            "(e<sup>ε</sup> − 1)), an upper bound that holds for any (ε, δ)-DP training. "
            "The data did not say who the patients are; name them (a DICOM Patient ID, a "
            "'patient' column of --labels-csv, train_patients in the .npz or patient-&lt;id&gt;/ "
            "folders) for a per-patient guarantee (docs/privacy.md).</p>")
    table = ("<table><caption>Group privacy for a patient with k training images</caption>"
             "<tr><th>Images k</th><th>ε</th><th>δ</th></tr>" + body + "</table>")
    if p.get("sample_rate") == 1 and not any("q = 1" in w for w in notes):  # older results
        notes.append("Sample rate q = 1: every DP-SGD step used every training image, so "
                     "there was no privacy amplification by subsampling.")
    return text + table + "".join(f'<p class="warn">{_e(w)}</p>' for w in notes)


def patients_cell(data: dict) -> str | None:
    """The Data section's "Patients" value, or None when the patients are unknown."""
    pat = data.get("patients")
    if not isinstance(pat, dict):
        return None
    counts = ", ".join(f"{_e(s)} {_fmt(pat[s])}" for s in ("train", "val", "test")
                       if pat.get(s) is not None)
    parts = [f"{counts}; up to {_fmt(pat.get('max_images_per_patient'))} images per "
             f"training patient (mean {_fmt(pat.get('mean_images_per_patient'), '.2f')})"]
    if pat.get("val_by_patient"):
        parts.append("the validation split holds out whole patients")
    for split in ("val", "test"):
        shared = pat.get(f"{split}_shares_with_train")
        if shared:
            parts.append(f'<span class="warn">{_fmt(shared)} patient(s) of {split} also in '
                         "train: its metrics are optimistic</span>")
    return "; ".join(parts)
