"""A federated run's results.json and report say per site only what the coordinator
legitimately knows (issue 15, item 4): ε, δ, rounds and refusals always; image counts,
σ and q only where a site disclosed them ("hidden" under secure aggregation, never 0 or
another site's figure); the headline is the weakest site's (max ε, max δ).

The real coordinator loop, aggregators, node protocol handler (secagg_fast) and report;
only each site's training is replaced by a fixed vector or the unchanged model."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
from federation_kit import FakeNode, FastTransport

from privmed.data import make_synthetic
from privmed.federation import FederationConfig, PlainAggregator, run_federation
from privmed.federation.messages import (
    WEIGHT_SCALE,
    NodeReply,
    state_to_arrays,
    trainable_keys,
    vector_length,
)
from privmed.models import create_model
from privmed.privacy import compute_epsilon, history_to_json
from privmed.report import ResultsSchemaError, read_results, validate_results
from privmed.report.html import render_report

SIZES = {"site-1": 90, "site-2": 500, "site-3": 610}
# site-2 has the largest epsilon, site-1 the largest delta: the headline needs both.
EPS = {"site-1": 2.5, "site-2": 2.99, "site-3": 2.0}
DELTAS = {"site-1": 1e-3, "site-2": 1e-4, "site-3": 1e-4}


@pytest.fixture(scope="module")
def heldout():
    return make_synthetic(n_train=2, n_val=0, n_test=40, seed=11).test


def _job(**kw) -> FederationConfig:
    return FederationConfig(**{**dict(job_id="rep", model="scatter-linear", rounds=2,
                                      local_epochs=1, batch_size=64, epsilon=3.0,
                                      normalize=False, min_nodes=3), **kw})


def _secure_sites(job: FederationConfig, heldout) -> FastTransport:
    """Three sites answering the real secure-aggregation protocol with a zero update
    weighted by their image count (or, distributed, their expected batch size), each
    telling the coordinator what ``secure.public_privacy`` lets through: ε and δ."""
    model = create_model(job.model, 1, 2, **job.model_kwargs(heldout.image_shape))
    length = vector_length(state_to_arrays(model), trainable_keys(model))
    nodes, hooks, rounds = {}, {}, {}
    for i, (name, n) in enumerate(SIZES.items()):
        vector = np.zeros(length)
        vector[-1] = (n if job.dp == "local" else 64) / WEIGHT_SCALE
        nodes[10 + i] = FakeNode(name, vector)

        def disclose(reply: NodeReply, name: str = name) -> NodeReply:
            rounds[name] = rounds.get(name, 0) + 1
            reply.privacy = {"enabled": True, "mode": job.dp, "delta": DELTAS[name],
                             "accountant": "prv", "rounds_trained": rounds[name],
                             "epsilon": EPS[name] * rounds[name] / job.rounds}
            return reply

        hooks[10 + i] = {"train": disclose}
    return FastTransport(nodes, hooks)


def _site_rows(page: str) -> dict[str, list[str]]:
    """The report's Sites table: site name -> its cells as text."""
    table = page.split("<h3>Sites</h3>", 1)[1].split("</table>", 1)[0]
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", table)[1:]:
        cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>",
                                                                          row)]
        rows[cells[0]] = cells
    return rows


@pytest.mark.parametrize("dp", ["local", "distributed"])
def test_secure_aggregation_report_shows_hidden_not_zero(heldout, tmp_path, dp):
    job = _job(dp=dp, secure_agg=True)
    results = run_federation(_secure_sites(job, heldout), job, heldout, tmp_path / "run",
                             log=lambda s: None)
    assert results == read_results(tmp_path / "run")  # what was written is what was built
    fed, privacy, data = results["federation"], results["privacy"], results["data"]

    # The headline is the weakest site's: the largest epsilon AND the largest delta.
    assert privacy["epsilon"] == pytest.approx(2.99) and privacy["worst_node"] == "site-2"
    assert privacy["delta"] == 1e-3 and privacy["delta_node"] == "site-1"
    # sigma, q and the history are per site, and hidden: never one site's as the job's
    assert privacy["noise_multiplier"] is None and privacy["sample_rate"] is None
    assert privacy["history"] == [] and privacy["ledger"] is None
    assert all(p["noise_multiplier"] is None and p["sample_rate"] is None
               for p in privacy["per_node"])
    assert {p["node"]: p["delta"] for p in privacy["per_node"]} == DELTAS

    # Image counts: hidden (null + named), never 0; the train size is the secure sum of
    # the image counts (--dp local), or hidden (distributed: a sum of batch sizes).
    assert {"num_examples", "noise_multiplier", "sample_rate"} <= set(fed["hidden"])
    assert all(s["num_examples"] is None for s in fed["sites"])
    assert all(n["num_examples"] is None for r in fed["rounds"] for n in r["nodes"])
    if dp == "local":
        assert data["sizes"]["train"] == sum(SIZES.values()) and "sizes_hidden" not in data
    else:
        assert data["sizes"]["train"] is None and data["sizes_hidden"] == ["train"]
    assert [(s["node"], s["rounds_ok"], s["ledger"]) for s in fed["sites"]] == [
        (name, 2, "kept by the site") for name in SIZES]

    page = (tmp_path / "run" / "report.html").read_text()  # rendered by the run
    sites = _site_rows(page)
    for name in SIZES:
        # Site | Images | Rounds trained | Refused | Failed | eps | delta | sigma | q | Ledger
        cells = sites[name]
        assert cells[1] == "hidden" and cells[7:9] == ["hidden", "hidden"], cells
        assert cells[2:5] == ["2", "0", "0"] and cells[9] == "kept by the site", cells
        assert cells[5] == f"{EPS[name]:.2f}" and float(cells[6]) == DELTAS[name], cells
    assert "(ε = 2.99, δ = 0.001)-DP" in page
    assert "the largest ε and the largest δ over the 3 sites" in page
    assert "not recorded" not in page and "kept by each site" in page
    assert ("train 1,200 (the sites' counts, securely summed)" if dp == "local"
            else 'train <span class="hidden">hidden</span>') in page
    assert "held-out test (the coordinator's) 40" in page
    # rounds are rounds, and the coordinator's held-out data is its test set
    assert "<th>Round</th>" in page and "Held-out test ROC-AUC" in page
    assert "Val ROC-AUC" not in page and "<th>Epoch</th>" not in page

    if dp == "distributed":  # `privmed report` on a run written before: 1 and 0 were hidden
        old = copy.deepcopy(results)
        old["schema"] = "privmed.results/1"
        old["data"]["sizes"]["train"] = 1
        del old["data"]["sizes_hidden"], old["federation"]["hidden"]
        for s in old["federation"]["sites"]:
            s["num_examples"] = 0
        page = render_report(old)
        assert 'train <span class="hidden">hidden</span>' in page and "train 1 " not in page
        assert all(cells[1] == "hidden" for cells in _site_rows(page).values())


class PlainSites:
    """Plain FedAvg: each site sends its (unchanged) model, its image count and its full
    accounting; site-2 refuses round 2 on its budget."""

    def __init__(self) -> None:
        self.sigma = {"site-1": 1.31, "site-2": 1.04, "site-3": 0.98}
        self.q = {"site-1": 0.5, "site-2": 0.125, "site-3": 0.1}

    def node_ids(self) -> list[int]:
        return [0, 1, 2]

    def train(self, ids, request, timeout):
        out = {}
        for i in ids:
            name = list(SIZES)[i]
            if name == "site-2" and request.round == 2:
                out[i] = NodeReply("refused", name, "Refused: with this run, dataset "
                                   "0123456789abcdef would reach epsilon 9.1 composed, over "
                                   "its budget of 6.", SIZES[name])
                continue
            history = [(self.sigma[name], self.q[name], 2 * request.round)]
            out[i] = NodeReply("ok", name, "", SIZES[name], {"loss": 0.5}, {
                "enabled": True, "mode": "local", "noise_multiplier": self.sigma[name],
                "sample_rate": self.q[name], "delta": DELTAS[name], "steps": 2,
                "accountant": "prv", "rounds_trained": request.round,
                "history": history_to_json(history),
                "epsilon": compute_epsilon(history, DELTAS[name], "prv"),
                "ledger_remaining_epsilon": 4.5}, arrays=request.arrays)
        return out


def test_plain_fedavg_report_shows_each_sites_own_figures(heldout, tmp_path):
    job = _job(dp="local", secure_agg=False)
    results = run_federation(PlainSites(), job, heldout, tmp_path / "run",
                             aggregator=PlainAggregator(), log=lambda s: None)
    fed, privacy = results["federation"], results["privacy"]
    per_node = {p["node"]: p for p in privacy["per_node"]}
    # each site's own sigma and q, never one site's shown as the job's
    assert {n: (p["noise_multiplier"], p["sample_rate"]) for n, p in per_node.items()} == {
        "site-1": (1.31, 0.5), "site-2": (1.04, 0.125), "site-3": (0.98, 0.1)}
    assert privacy["noise_multiplier"] is None and privacy["sample_rate"] is None
    assert privacy["delta"] == 1e-3 == max(p["delta"] for p in per_node.values())
    assert privacy["epsilon"] == max(p["epsilon"] for p in per_node.values())
    assert fed["hidden"] == [] and results["data"]["sizes"]["train"] == 1200
    # a null train size is only valid when it is declared hidden
    unknown = copy.deepcopy(results)
    unknown["data"]["sizes"]["train"] = None
    with pytest.raises(ResultsSchemaError, match=r"data\.sizes\.train"):
        validate_results(unknown)
    unknown["data"]["sizes_hidden"] = ["train"]
    validate_results(unknown)
    sites = {s["node"]: s for s in fed["sites"]}
    assert {n: s["num_examples"] for n, s in sites.items()} == SIZES
    assert (sites["site-2"]["rounds_ok"], sites["site-2"]["rounds_refused"]) == (1, 1)
    # the largest site epsilon never goes down because the largest site sat a round out
    curve = [e["epsilon"] for e in results["training"]["epochs"]]
    assert curve == sorted(curve) and curve[-1] == pytest.approx(privacy["epsilon"])

    page = (tmp_path / "run" / "report.html").read_text()  # rendered by the run
    rows = _site_rows(page)
    assert rows["site-2"][1:5] == ["500", "1", "1", "0"], rows["site-2"]
    assert rows["site-2"][7:9] == ["1.04", "0.125"], rows["site-2"]
    assert rows["site-3"][7:9] == ["0.98", "0.1"], rows["site-3"]
    assert "hidden" not in rows["site-1"] and "(ε 4.50 left)" in rows["site-1"][9]
    assert "train 1,200 (the sum of the counts the 3 sites disclosed)" in page
    assert "round 2, site-2: refused: Refused: with this run" in page
