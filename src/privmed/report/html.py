"""A self-contained HTML page for one run (``report.html`` next to ``results.json``).

Everything is inline (CSS, PNGs as base64 data URIs) so the file can be mailed
or archived alone. Every string from the results is escaped. Later features
extend the page in two ways: optional top-level keys this module does not know
(``audit``, ``federation``, ...) are rendered generically as tables, and callers
may pass ``extra_sections=[(title, trusted_html)]``.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from privmed.report.results import _validated, atomic_write_text, read_results, results_path

REPORT_FILENAME = "report.html"

#: Top-level keys with a dedicated section; any other key gets a generic one.
KNOWN_KEYS = frozenset({"schema", "privmed_version", "created", "command", "run_id", "seed", "data",
                        "model", "training", "privacy", "metrics", "environment",
                        "federation", "audit",
                        "operating_point",  # shown in the Metrics section
                        "external_tests"})
INVERSION_GRID = "audit-inversion.png"

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2433;
background:#f5f6f8;line-height:1.45}
main{max-width:1000px;margin:0 auto;padding:1.5rem}
header{border-bottom:2px solid #d0d5dd;margin-bottom:1rem}
h1{font-size:1.6rem;margin:.2rem 0}h2{font-size:1.2rem;margin:1.4rem 0 .5rem}
.sub{color:#556;margin:.2rem 0 .8rem}
section{background:#fff;border:1px solid #e0e3e8;border-radius:8px;padding:.4rem 1rem 1rem;
margin:1rem 0}
table{border-collapse:collapse;margin:.4rem 0;font-size:.92rem}
th,td{border:1px solid #d8dce3;padding:.25rem .6rem;text-align:left;vertical-align:top}
th{background:#eef1f5}td.n{text-align:right;font-variant-numeric:tabular-nums}
.privacy{border-radius:8px;padding:.6rem 1rem;margin:1rem 0}
.dp{background:#eaf6ee;border:2px solid #2e8b57}
.nodp{background:#fdecea;border:3px solid #c0392b;color:#7b1d14;font-size:1.05rem}
.eps{font-size:1.5rem;font-weight:600;margin:.3rem 0}
.warn{color:#b03a2e;font-weight:600}
.hidden{color:#556;font-style:italic}
.cms{display:flex;flex-wrap:wrap;gap:1.5rem}
figure{display:inline-block;margin:.5rem 1rem .5rem 0}
figure img{max-width:100%;border:1px solid #e0e3e8}
figcaption{color:#556;font-size:.9rem}
code{background:#eef1f5;padding:0 .25rem;border-radius:3px}
.op{background:#eef4fb;border-left:4px solid #2463eb;padding:.2rem .9rem;margin:.6rem 0}
small{color:#556}td.n small{white-space:nowrap}
"""


# --------------------------------------------------------------------------- small helpers

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, spec: str = ".3f") -> str:
    """A number for display; None (missing or NaN in the run) shows as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format(value, spec)
    return _e(value)


def _kv(rows: Iterable[tuple[str, str]]) -> str:
    """Two-column table; keys are escaped here, values must already be HTML."""
    body = "".join(f"<tr><th scope=row>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>{body}</section>'


def _generic(value: Any, depth: int = 0) -> str:
    """Any JSON value as nested tables, for sections added by later schema additions."""
    if depth > 6:
        return f"<code>{_e(json.dumps(value))}</code>"
    if isinstance(value, Mapping):
        if not value:
            return "—"
        return _kv((str(k), _generic(v, depth + 1)) for k, v in value.items())
    if isinstance(value, list):
        if not value:
            return "—"
        if all(isinstance(v, Mapping) for v in value):
            cols = list(dict.fromkeys(k for row in value for k in row))
            head = "".join(f"<th>{_e(c)}</th>" for c in cols)
            rows = "".join("<tr>" + "".join(f"<td>{_generic(r.get(c), depth + 1)}</td>"
                                            for c in cols) + "</tr>" for r in value)
            return f"<table><tr>{head}</tr>{rows}</table>"
        if all(not isinstance(v, Mapping | list) for v in value):
            return ", ".join(_generic(v, depth + 1) for v in value)
        return "<ol>" + "".join(f"<li>{_generic(v, depth + 1)}</li>" for v in value) + "</ol>"
    return _fmt(value, ".4g")


# --------------------------------------------------------------------------- sections

def _header(r: dict) -> str:
    data, model = r["data"], r["model"]
    sub = (f"{_e(model['name'])} ({model['parameters']:,} parameters) trained on "
           f"<strong>{_e(data['source'])}</strong> · {_e(r['created'])} · "
           f"privmed {_e(r['privmed_version'])}")
    sizes = ", ".join(f"{_e(k)} {_fmt(v)}" for k, v in data["sizes"].items())
    id_label = "Dataset id"
    if isinstance(r.get("federation"), dict):  # the sites' sum (or hidden), held-out test
        from privmed.report.federated import split_sizes

        sizes, id_label = split_sizes(r), "Held-out test set id (each site's data has its own)"
    table = _kv([
        ("Data source", _e(data["source"])),
        (id_label, f"<code>{_e(data['dataset_id'])}</code>"),
        ("Classes", ", ".join(_e(c) for c in data["classes"])),
        ("Image shape (C × H × W)", " × ".join(str(s) for s in data["image_shape"])),
        ("Split sizes", sizes),
        *_patients(data),
    ])
    return (f"<header><h1>privmed report: {_e(model['name'])} on {_e(data['source'])}</h1>"
            f'<p class="sub">{sub}</p></header>{_section("Data", table, "data")}')


def _patients(data: dict) -> list[tuple[str, str]]:
    from privmed.report.privacy_unit import patients_cell

    cell = patients_cell(data)
    return [] if cell is None else [("Patients", cell)]


def _privacy(p: dict) -> str:
    if not p["enabled"]:
        return ('<div class="privacy nodp" role="alert" id="privacy"><strong>NO differential '
                "privacy.</strong> This model was trained without DP-SGD and carries no formal "
                "privacy guarantee: it may memorise and reveal its training images.</div>")
    steps = sum(h["steps"] for h in p["history"])
    ledger = p.get("ledger")
    if ledger is None:
        ledger_html = "not recorded in a privacy ledger"
    else:
        state = (' <span class="warn">(budget exhausted)</span>'
                 if ledger["remaining_epsilon"] <= 0 else "")
        ledger_html = (f"ε {_fmt(ledger['spent_epsilon'], '.2f')} of "
                       f"{_fmt(ledger['budget_epsilon'], '.2f')} spent, "
                       f"{_fmt(ledger['remaining_epsilon'], '.2f')} remaining{state} "
                       f"(<code>{_e(ledger['path'])}</code>, dataset "
                       f"<code>{_e(ledger['dataset_id'])}</code>)")
    rows = [
        ("Accountant", _e(p["accountant"])),
        ("Target ε", _fmt(p.get("target_epsilon"), ".2f")),
        ("Noise multiplier σ", _fmt(p["noise_multiplier"], ".4g")),
        ("Clipping norm C", _fmt(p["max_grad_norm"], ".4g")),
        ("Sample rate q", _fmt(p["sample_rate"], ".4g")),
        ("Optimiser steps", str(steps)),
        ("Ledger", ledger_html),
    ]
    history = note = ""
    if "per_node" in p:  # federated: the weakest site's (ε, δ); σ, q and ledgers per site
        from privmed.report.federated import privacy_note, privacy_rows

        rows, note = privacy_rows(p), privacy_note(p)
    if len(p["history"]) > 1:  # resumed or re-configured runs: show each phase
        history = "<p>Accounting history (one row per phase):</p>" + _generic(p["history"])
    from privmed.report.privacy_unit import privacy_unit_html  # per image; group privacy

    return (f'<div class="privacy dp" id="privacy"><h2>Differential privacy</h2>'
            f'<p class="eps">(ε = {_fmt(p["epsilon"], ".2f")}, '
            f'δ = {_fmt(p["delta"], ".3g")})-DP</p>{note}{_kv(rows)}'
            f"{privacy_unit_html(p)}{history}</div>")


def _metrics(r: dict) -> str:
    from privmed.report.metrics_html import metrics_section  # imports this module's helpers

    return metrics_section(r)


def _plots(r: dict) -> str:
    from privmed.report import plots  # lazy: matplotlib only when a report is rendered

    fed = isinstance(r.get("federation"), dict)  # rounds, scored on the held-out test set
    figures: list[tuple[str, Callable[[], bytes | None]]] = [
        ("ROC curve of the positive class's score; the dot is the operating point",
         lambda: plots.roc_figure(r["metrics"])),
        ("One-vs-rest ROC curves, one per class",
         lambda: plots.multiclass_roc_figure(r["metrics"])),
        ("Training loss and held-out test scores per round" if fed else
         "Training loss and validation scores", lambda: plots.training_figure(
            r["training"]["epochs"], federated=fed)),
        ("Privacy spent over training", lambda: plots.epsilon_figure(r["privacy"])),
    ]
    parts = []
    for caption, make in figures:
        png = make()
        if png is not None:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f'<figure><img alt="{_e(caption)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{_e(caption)}</figcaption></figure>")
    return _section("Plots", "".join(parts) or "<p>Nothing to plot.</p>", "plots")


def _training(r: dict) -> str:
    t = r["training"]
    cols = ("epoch", "steps", "loss", "val_auc", "val_accuracy", "epsilon", "seconds")
    specs = {"loss": ".4f", "epsilon": ".2f", "seconds": ".1f"}
    # Per-epoch accuracy is at argmax: the operating point is chosen after training.
    names = ("Epoch", "Steps", "Loss", "Val ROC-AUC", "Val ACC (argmax)", "ε", "Seconds")
    unit = "epochs"
    if isinstance(r.get("federation"), dict):  # one row per round, on the held-out test set
        from privmed.report.federated import TRAINING_COLUMNS

        names, unit = TRAINING_COLUMNS, "rounds"
    head = "".join(f"<th>{n}</th>" for n in names)
    rows = "".join("<tr>" + "".join(f'<td class="n">{_fmt(e.get(c), specs.get(c, ".3f"))}</td>'
                                    for c in cols) + "</tr>" for e in t["epochs"])
    body = (f"<p>{len(t['epochs'])} {unit} in {_fmt(t['seconds'], '.1f')} s.</p>"
            f"<table><tr>{head}</tr>{rows}</table><h3>Configuration</h3>"
            f"{_generic(t['config'])}")
    return _section("Training", body, "training")


def _reproducibility(r: dict) -> str:
    seed = (f"{r['seed']}: fixes the model's initialisation, the splits privmed makes (the "
            "validation split carved from train, site splits) and, without DP, the order of "
            "the training data.")
    if r["privacy"]["enabled"]:
        seed += (" DP-SGD's noise and Poisson sampling do not depend on it: they come from a "
                 "cryptographically secure generator under a fresh key and are not "
                 "reproducible by design (docs/privacy.md), so repeating this run with the "
                 "same seed gives the same guarantee, not the same weights.")
    rows = [("Seed", _e(seed)),
            ("Dataset id", f"<code>{_e(r['data']['dataset_id'])}</code>"),
            ("Results schema", _e(r["schema"]))]
    if r.get("run_id"):
        rows.append(("Run id", f"<code>{_e(r['run_id'])}</code>"))
    if r.get("command"):
        rows.append(("Command", f"<code>{_e(r['command'])}</code>"))
    rows += [(k, _fmt(v)) for k, v in r["environment"].items()]
    return _section("Reproducibility", _kv(rows), "reproducibility")


# --------------------------------------------------------------------------- public API

def _eps(value: Any) -> str:
    return "none (no DP)" if value is None else _fmt(value, ".2f")


def _audit(a: dict, grid: bytes | None = None) -> str:
    """Measured leakage next to the claimed ε: membership attacks, one-run audit,
    gradient inversion."""
    from privmed.report import plots

    parts = []
    m = a.get("membership")
    if isinstance(m, dict):
        conf = m.get("confidence", 0.95)
        head = ("<tr><th>Attack</th><th>ROC-AUC</th><th>TPR @ 0.1% FPR</th>"
                f"<th>TPR @ 1% FPR</th><th>ε lower bound ({_fmt(conf * 100, '.0f')}%)</th></tr>")
        rows = []
        online = m.get("attack") == "lira-online"
        for key, name in (("lira", "LiRA (online)" if online else "LiRA (offline)"),
                          ("lira_offline", "LiRA (offline)"), ("loss", "LOSS threshold")):
            x = m.get(key)
            if isinstance(x, dict):
                rows.append(f"<tr><td>{_e(name)}</td><td class=n>{_fmt(x.get('auc'))}</td>"
                            f"<td class=n>{_fmt(x.get('tpr_at_fpr_0.001'))}</td>"
                            f"<td class=n>{_fmt(x.get('tpr_at_fpr_0.01'))}</td>"
                            f"<td class=n>{_fmt((x.get('epsilon') or {}).get('eps_lb'), '.2f')}"
                            "</td></tr>")
        verdict = ("Consistent with the claim" if m.get("consistent")
                   else '<span class="warn">exceeds the claimed ε: investigate</span>')
        unit = m.get("unit") or "image"
        per = f" per {_e(unit)}"
        parts.append(
            f"<p class=eps>Claimed ε = {_eps(m.get('claimed_epsilon'))}{per} · measured ε ≥ "
            f"{_fmt(m.get('eps_lb'), '.2f')}{per}</p><p>{verdict}. Membership inference with "
            f"{_e(m.get('shadows'))} shadow models on {_e(m.get('examples'))} {_e(unit)}s (half "
            f"members: the run's training {_e(unit)}s; half non-members: held-out ones). "
            + (f"The claim is {_e(m['claim_basis'])}. "
               if m.get("claim_basis") and m["claim_basis"].startswith("from") else "")
            + "A lower "
            "bound is what an attack proves; the claim is an upper bound.</p>"
            f"<table>{head}{''.join(rows)}</table>")
        png = plots.membership_figure(m)
        if png is not None:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f'<figure><img alt="membership ROC" src="data:image/png;base64,'
                         f'{data}"><figcaption>Membership attacks, log-log ROC</figcaption>'
                         "</figure>")
    o = a.get("one_run")
    if isinstance(o, dict):
        parts.append(f"<h3>One-run audit (Steinke et al. 2023)</h3><p>{_e(o.get('canaries'))} "
                     f"canaries, {_e(o.get('correct'))} of {_e(o.get('guesses'))} guesses "
                     f"right: ε ≥ {_fmt(o.get('eps_lb'), '.2f')} against claimed "
                     f"{_eps(o.get('claimed_epsilon'))}.</p>")
    inv = a.get("inversion")
    if isinstance(inv, dict) and inv.get("rows"):
        head = ("<tr><th>Update the attacker sees</th><th>Batch</th><th>PSNR (dB)</th>"
                "<th>SSIM</th><th>Labels recovered</th></tr>")
        rows = "".join(f"<tr><td>{_e(r.get('scenario'))}</td><td class=n>"
                       f"{_e(r.get('batch_size'))}</td><td class=n>"
                       f"{_fmt(r.get('psnr_mean'), '.1f')}</td><td class=n>"
                       f"{_fmt(r.get('ssim_mean'))}</td><td class=n>"
                       f"{_fmt(r.get('label_accuracy'), '.0%')}</td></tr>" for r in inv["rows"])
        parts.append("<h3>Gradient inversion (Geiping et al. 2020)</h3>"
                     f"<table>{head}{rows}</table>")
        if grid is not None:
            data = base64.b64encode(grid).decode("ascii")
            parts.append(f'<figure><img alt="reconstructions" src="data:image/png;base64,'
                         f'{data}"><figcaption>Per row pair: the node\'s images, then what '
                         "the attacker rebuilt from the update it saw.</figcaption></figure>")
    others = {k: v for k, v in a.items() if k not in ("membership", "one_run", "inversion")}
    if others:
        parts.append(_generic(others))
    return _section("Privacy audit: claimed vs measured", "".join(parts), "audit")


def render_report(results: Mapping[str, Any],
                  extra_sections: Sequence[tuple[str, str]] = (), *,
                  inversion_grid: bytes | None = None) -> str:
    """The report page as an HTML string.

    ``extra_sections`` are ``(title, html)`` pairs appended at the end; the title is
    escaped, the HTML is trusted as given (escape your own data). Unknown top-level
    keys of ``results`` get a generic section each.
    """
    r = _validated(results, "The results dict")
    parts = [_header(r), _privacy(r["privacy"])]
    if isinstance(r.get("audit"), dict):  # measured leakage right under the claimed epsilon
        parts.append(_audit(r["audit"], inversion_grid))
    parts.append(_metrics(r))
    if isinstance(r.get("federation"), dict):  # each site's figures, under the job's
        from privmed.report.federated import federation_section

        parts.append(federation_section(r))
    from privmed.report.external import external_tests_section

    parts += [external_tests_section(r), _plots(r), _training(r)]
    parts.append(_reproducibility(r))
    for key, value in r.items():
        if key not in KNOWN_KEYS:
            parts.append(_section(key.replace("_", " ").capitalize(), _generic(value),
                                  f"x-{key}"))
    for i, (title, body) in enumerate(extra_sections):
        parts.append(_section(title, body, f"extra-{i}"))
    title = f"privmed report: {r['model']['name']} on {r['data']['source']}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
            f"<body><main>{''.join(parts)}</main></body></html>\n")


def write_report(run_dir: str | os.PathLike[str],
                 extra_sections: Sequence[tuple[str, str]] = ()) -> Path:
    """Read ``results.json`` in ``run_dir`` (or that file itself) and write
    ``report.html`` next to it atomically; returns the report's path."""
    results_file = results_path(run_dir)
    grid = results_file.parent / INVERSION_GRID  # written by `privmed audit inversion --run`
    page = render_report(read_results(results_file), extra_sections,
                         inversion_grid=grid.read_bytes() if grid.is_file() else None)
    out = results_file.parent / REPORT_FILENAME
    atomic_write_text(out, page)
    return out
