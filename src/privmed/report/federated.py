"""The federated parts of ``report.html``: per-site figures as the coordinator knows them.

A federated run's results (``privmed.federation.coordinator.results``) hold per site only what
the coordinator legitimately learns: ε, δ, rounds, refusals; image counts, σ and q only
where the site disclosed them. Under secure aggregation those are null and named in
``federation.hidden``: this page prints "hidden", never 0 or another site's figure. The
headline (ε, δ) is the weakest site's, and every ledger is kept by its site.
"""

from __future__ import annotations

import html
import math
from typing import Any

from privmed.report.html import _e, _fmt, _section

HIDDEN = "hidden"
#: What secure aggregation keeps from the coordinator, for every site: these keys are null
#: in ``federation.sites[]``, ``federation.rounds[].nodes[]`` and ``privacy.per_node[]``
#: and listed in ``federation.hidden`` (assumed for older secure-aggregation results).
SECURE_HIDDEN = ("num_examples", "noise_multiplier", "sample_rate", "history", "loss",
                  "val_auc", "seconds", "ledger_remaining_epsilon")
TRAINING_COLUMNS = ("Round", "Steps", "Loss", "Held-out test ROC-AUC", "Held-out test ACC",
                    "Largest site ε", "Seconds")


def is_federated(r: dict) -> bool:
    return isinstance(r.get("federation"), dict)


def hidden_keys(r: dict) -> set[str]:
    """Keys the sites kept from the coordinator (null in every site's row)."""
    fed = r.get("federation") or {}
    if "hidden" in fed and isinstance(fed["hidden"], list):
        return {str(k) for k in fed["hidden"]}
    return set(SECURE_HIDDEN) if fed.get("aggregator") == "secagg" else set()


def _site_value(value: Any, key: str, hidden: set[str], spec: str = ".3f") -> str:
    """A site's figure; "hidden" where secure aggregation kept it from the coordinator."""
    # privmed.results/1 files wrote a hidden image count as 0
    if key in hidden and (value is None or (key == "num_examples" and value == 0)):
        return f'<span class="hidden">{HIDDEN}</span>'
    return _fmt(value, spec)


def _up(value: float | None) -> float | None:
    """A spent ε to 2 decimals, rounded up: a privacy loss is never shown smaller."""
    return None if value is None else math.ceil(value * 100 - 1e-9) / 100


def _down(value: float | None) -> float | None:
    """A remaining budget to 2 decimals, rounded down: never shown larger."""
    return None if value is None else math.floor(value * 100 + 1e-9) / 100


def split_sizes(r: dict) -> str:
    """The header's split sizes: the sites' sum (or hidden) and the coordinator's test set."""
    data, fed = r["data"], r["federation"]
    train = data["sizes"].get("train")
    n_sites = len(fed.get("sites") or [])
    if (r.get("schema") == "privmed.results/1" and fed.get("aggregator") == "secagg"
            and r.get("privacy", {}).get("mode") == "distributed"):
        train = None  # /1 wrote 1 here: the secure sum held batch sizes, not images
    if train is None:
        train_html = (f'train <span class="hidden">{HIDDEN}</span> (secure aggregation: the '
                      "sites' image counts stay at the sites)")
    elif fed.get("aggregator") == "secagg":
        train_html = f"train {train:,} (the sites' counts, securely summed)"
    else:
        train_html = f"train {train:,} (the sum of the counts the {n_sites} sites disclosed)"
    parts = [train_html]
    for split, n in data["sizes"].items():
        if split == "train":
            continue
        name = "held-out test (the coordinator's)" if split == "test" else _e(split)
        parts.append(f"{name} {_fmt(n)}")
    return ", ".join(parts)


def privacy_note(p: dict) -> str:
    """Under the headline: whose (ε, δ) it is."""
    rows = p.get("per_node") or []
    sites = p.get("sites") or len(rows)

    def attaining(key: str) -> str:
        """The sites with the largest value ("every site" on a tie of all)."""
        names = [str(r["node"]) for r in rows if r.get(key) == p.get(key)]
        if not names or len(names) == len(rows) > 1:
            return "every site"
        return ", ".join(_e(n) for n in names)

    where = f" (ε: {attaining('epsilon')}; δ: {attaining('delta')})" if rows else ""
    return (f"<p>The weakest site's guarantee: the largest ε and the largest δ over the "
            f"{sites} site{'s' if sites != 1 else ''} that took part{where}; it holds for "
            "every site, each with respect to one of its own training images. Each site's "
            "own (ε, δ) is in the Federation section below.</p>")


def privacy_rows(p: dict) -> list[tuple[str, str]]:
    """The privacy table of a federated run: σ and q are per site, ledgers at the sites."""
    # Only secure aggregation keeps a site's σ from the coordinator.
    secure = any(row.get("noise_multiplier") is None for row in p.get("per_node") or [])
    per_site = ("per site, hidden: secure aggregation keeps them at the sites" if secure
                else "per site: see the Sites table below")
    remaining = [row.get("ledger_remaining_epsilon") for row in p.get("per_node") or []]
    ledger = "kept by each site (the coordinator does not see it)"
    if remaining and all(v is not None for v in remaining):
        ledger += "; remaining ε per site in the Sites table below"
    mode = {"distributed": "distributed DP (one central DP-SGD step per round, its noise "
                           "added in shares by the sites)",
            "local": "local DP (each site runs DP-SGD on its own images)"}.get(
        str(p.get("mode")), _e(p.get("mode")))
    return [
        ("DP mode", mode),
        ("Accountant", _e(p["accountant"])),
        ("Target ε (each site)", _fmt(p.get("target_epsilon"), ".2f")),
        ("Noise multiplier σ", per_site),
        ("Clipping norm C", _fmt(p["max_grad_norm"], ".4g")),
        ("Sample rate q", per_site),
        ("Ledger", ledger),
    ]


def _rounds_table(fed: dict) -> str:
    head = ("<tr><th>Round</th><th>Status</th><th>Sites contributing</th>"
            "<th>Held-out test ROC-AUC</th><th>Held-out test ACC</th><th>Seconds</th></tr>")
    rows = "".join(
        f"<tr><td class=n>{r['round']}</td><td>{_e(r['status'])}</td><td class=n>"
        f"{r['contributors']}/{len(r['nodes'])}</td><td class=n>{_fmt(r['heldout_auc'])}</td>"
        f"<td class=n>{_fmt(r['heldout_accuracy'])}</td><td class=n>{r['seconds']:.1f}</td></tr>"
        for r in fed["rounds"])
    return f"<table>{head}{rows}</table>"


def _sites_table(r: dict, hidden: set[str]) -> str:
    fed = r["federation"]
    per_node = {row["node"]: row for row in r.get("privacy", {}).get("per_node") or []}
    head = ("<tr><th>Site</th><th>Images</th><th>Rounds trained</th><th>Refused</th>"
            "<th>Failed</th><th>ε</th><th>δ</th><th>σ</th><th>q</th><th>Ledger</th></tr>")
    rows = []
    for s in fed["sites"]:
        p = per_node.get(s["node"], {})
        released = bool(p)  # a site that never released anything has no privacy figures
        remaining = p.get("ledger_remaining_epsilon")
        ledger = _e(s.get("ledger") or "kept by the site")
        if remaining is not None:
            ledger += f" (ε {_fmt(_down(remaining), '.2f')} left)"
        sigma = (_site_value(p.get("noise_multiplier"), "noise_multiplier", hidden, ".4g")
                 if released else "—")
        q = _site_value(p.get("sample_rate"), "sample_rate", hidden, ".4g") if released else "—"
        rows.append(
            f"<tr><td>{_e(s['node'])}</td>"
            f"<td class=n>{_site_value(s.get('num_examples'), 'num_examples', hidden, ',')}"
            f"</td><td class=n>{s.get('rounds_ok', 0)}</td>"
            f"<td class=n>{s.get('rounds_refused', 0)}</td>"
            f"<td class=n>{s.get('rounds_failed', 0)}</td>"
            f"<td class=n>{_fmt(_up(s.get('epsilon', p.get('epsilon'))), '.2f')}</td>"
            f"<td class=n>{_fmt(s.get('delta', p.get('delta')), '.3g')}</td>"
            f"<td class=n>{sigma}</td><td class=n>{q}</td><td>{ledger}</td></tr>")
    note = ""
    if hidden:
        note = ("<p>Under secure aggregation the coordinator sees only the sum of the "
                "sites' updates and, per site, its status, ε and δ: a site's image count, "
                "σ, q, loss and remaining budget stay at the site (<em>hidden</em>).</p>")
    return f"<table>{head}{''.join(rows)}</table>{note}"


def federation_section(r: dict) -> str:
    """Per-round and per-site tables of a federated run."""
    fed = r["federation"]
    hidden = hidden_keys(r)
    reasons = "".join(
        f"<li>round {x['round']}, {_e(n['node'])}: {_e(n['status'])}: {_e(n['reason'])}</li>"
        for x in fed["rounds"] for n in x["nodes"] if n["status"] != "ok")
    config = r.get("training", {}).get("config", {})
    mode = {"distributed": "distributed DP (each node adds 1/√t of one central DP-SGD step's "
                           "noise; the coordinator sees only the sum)",
            "local": "local DP (each node runs DP-SGD on its own)",
            "none": "no DP"}.get(r.get("privacy", {}).get("mode"), "")
    norm = (f" Inputs standardised with the sites' DP statistics: mean "
            f"{', '.join(f'{v:.3f}' for v in config['input_mean'])}, std "
            f"{', '.join(f'{v:.3f}' for v in config['input_std'])}."
            if config.get("input_mean") else "")
    aggregator = {"secagg": "secure aggregation", "fedavg": "plain FedAvg (the coordinator "
                  "sees every update)"}.get(str(fed.get("aggregator")), str(fed.get("aggregator")))
    body = (f"<p>Aggregation: {html.escape(aggregator)}"
            + (f"; {html.escape(mode)}" if mode else "") + f".{html.escape(norm)} Scores are "
            "the global model's on the coordinator's held-out test set.</p>"
            + _rounds_table(fed)
            + (f"<h3>Refusals and failures</h3><ul>{reasons}</ul>" if reasons else "")
            + f"<h3>Sites</h3>{_sites_table(r, hidden)}")
    return _section("Federation", body, "federation")
