"""The top-level front doors (``privmed.train``, ``privmed.simulate``...), each run for real
on the synthetic data, small."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import privmed
from privmed.errors import BudgetExceededError, ConfigError
from privmed.privacy import BudgetLedger


@pytest.fixture(scope="module")
def bundle():
    return privmed.load_data("synthetic")


def test_every_front_door_is_exported_lazily():
    # `privmed --help` must stay quick: importing the package imports no torch
    code = ("import sys, privmed; assert 'torch' not in sys.modules; "
            "print(sorted(privmed.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    names = set(json.loads(out.stdout.strip().replace("'", '"')))
    doors = {"train", "train_run", "model_for", "simulate", "compile_encrypted",
             "serve_encrypted", "infer_encrypted", "audit_membership", "audit_inversion",
             "deidentify_dicom", "anonymize_table", "dp_table_stats"}
    assert doors <= names
    for name in doors:
        assert callable(getattr(privmed, name)) and getattr(privmed, name).__doc__


def test_model_for_sizes_a_model_from_the_data(bundle):
    model = privmed.model_for(bundle, "he-cnn")
    x = bundle.train.images[:2]
    assert model(x).shape == (2, bundle.train.num_classes)
    assert privmed.model_for(bundle.test).__class__.__name__ == "ScatterNet"
    with pytest.raises(ConfigError, match="ImageDataset or a DataBundle"):
        privmed.model_for("synthetic")


def test_train_writes_a_dp_run_and_charges_the_ledger(bundle, tmp_path):
    ledger = tmp_path / "ledger.sqlite"
    results = privmed.train(bundle, tmp_path / "run", epsilon=2.0, epochs=2, ledger=ledger,
                            budget_epsilon=2.5, say=lambda s: None)
    assert 0 < results["privacy"]["epsilon"] <= 2.0
    for name in ("model.pt", "results.json", "report.html"):
        assert (tmp_path / "run" / name).is_file()
    book = BudgetLedger(ledger)
    spent = book.spent(bundle.train.dataset_id)
    assert spent == pytest.approx(results["privacy"]["epsilon"], abs=1e-6)
    # a second run at ε = 2 overspends a budget of 2.5 (composed tightly, not summed)
    with pytest.raises(BudgetExceededError):
        privmed.train(bundle, tmp_path / "again", epsilon=2.0, epochs=2, ledger=ledger,
                      say=lambda s: None)
    assert book.spent(bundle.train.dataset_id) == pytest.approx(spent)


def test_train_refuses_contradictions_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="--no-dp cannot be combined"):
        privmed.train("synthetic", tmp_path / "r", dp=False, epsilon=3.0)
    with pytest.raises(ConfigError, match="neither a registered model"):
        privmed.train("synthetic", tmp_path / "r", model="no-such-net")
    with pytest.raises(ConfigError, match="Unknown training option"):
        privmed.train("synthetic", tmp_path / "r", epochz=3)
    assert not (tmp_path / "r").exists()


def test_simulate_one_bundle_over_three_sites_with_secure_aggregation(bundle, tmp_path):
    results = privmed.simulate(bundle, tmp_path / "fed", num_sites=3, rounds=3, epsilon=3.0,
                               ledger_dir=tmp_path / "ledgers", log=None)
    assert results["federation"]["aggregator"] == "secagg"
    assert results["privacy"]["mode"] == "distributed"
    assert [n["node"] for n in results["privacy"]["per_node"]] == ["site-1", "site-2",
                                                                    "site-3"]
    assert results["privacy"]["epsilon"] <= 3.0 + 1e-9
    assert (tmp_path / "fed" / "report.html").is_file()
    book = BudgetLedger(tmp_path / "ledgers" / "ledger.sqlite")
    rows = book.summary()
    assert len(rows) == 3 and all(0 < r["spent"] <= 3.0 for r in rows)
    assert {r["epsilon"] for r in rows} == {6.0}  # 2 x epsilon on first use


def test_simulate_given_site_bundles_and_heldout_local_dp(bundle, tmp_path):
    sites = privmed.data.split_sites(bundle, 2, seed=1)
    results = privmed.simulate(sites, tmp_path / "fed", heldout=bundle.test, dp="local",
                               rounds=1, local_epochs=1, batch_size=128, epsilon=2.0,
                               ledger_dir=tmp_path / "ledgers", log=None)
    assert results["privacy"]["mode"] == "local"
    assert all(r["epsilon"] <= 2.0 + 1e-9 for r in results["privacy"]["per_node"])
    assert np.isfinite(results["metrics"]["test"]["roc_auc"])
    with pytest.raises(ConfigError, match="heldout="):
        privmed.simulate(sites, tmp_path / "fed2", log=None)


def test_simulate_refuses_an_overspending_job_before_any_round(bundle, tmp_path):
    # the same up-front whole-job check as `privmed federate` (federation/test_site_ledgers)
    sites = privmed.data.split_sites(bundle, 2, seed=2)
    ledgers = tmp_path / "ledgers"
    first = privmed.simulate(sites, tmp_path / "fed", heldout=bundle.test, rounds=2,
                             batch_size=128, epsilon=3.0, ledger_dir=ledgers,
                             budget_epsilon=3.5, log=None)
    assert first["privacy"]["epsilon"] <= 3.0 + 1e-9
    book = BudgetLedger(ledgers / "ledger.sqlite")
    before = sorted((e["dataset_id"], e["run_id"], e["status"]) for e in book.entries())
    # ε = 3 fits a budget of 3.5 alone, but not composed with the first job (≈ 3.8)
    with pytest.raises(BudgetExceededError) as info:
        privmed.simulate(sites, tmp_path / "again", heldout=bundle.test, rounds=2,
                         batch_size=128, epsilon=3.0, ledger_dir=ledgers, log=None)
    assert str(info.value).startswith(
        f"Refused for site-1 (ledger {ledgers / 'ledger.sqlite'}): with this run")
    assert "over its budget of 3.50" in str(info.value)
    assert not (tmp_path / "again").exists()  # refused before any round or file
    assert sorted((e["dataset_id"], e["run_id"], e["status"])
                  for e in book.entries()) == before


def test_encrypted_compile_serve_infer_matches_plaintext(bundle, tmp_path):
    from privmed.encrypted import HEModel

    privmed.train(bundle, tmp_path / "he", model="he-cnn", epsilon=3.0, epochs=3,
                  batch_size=256, lr=3e-2, say=lambda s: None)
    report = privmed.compile_encrypted(tmp_path / "he", data=bundle, check=2,
                                       calibration_images=200)
    assert report["path"] == tmp_path / "he" / "model.he"
    assert report["check"]["same_decisions"] == 1.0
    he = HEModel.load(report["path"])
    images = bundle.test.images[:3].numpy()
    plain = he.plain_logits(images)
    # one ciphertext per image (batch packing is checked in tests/encrypted: it is slow)
    with privmed.serve_encrypted(report["path"], background=True) as server:
        predictions = privmed.infer_encrypted(images, server.url)
    assert server.process.poll() is not None  # stopped on leaving the block
    op = he.card["operating_point"]
    for logits, p in zip(plain, predictions, strict=True):
        scores = np.exp(logits) / np.exp(logits).sum()
        assert p.scores == pytest.approx(scores.tolist(), abs=1e-3)
        pos = op["positive_index"]
        assert p.class_index == (pos if scores[pos] >= op["threshold"] else 1 - pos)
    with pytest.raises(ConfigError, match="not a compiled one"):
        privmed.serve_encrypted(tmp_path / "he" / "model.pt", background=True)


def test_audit_membership_puts_the_measured_epsilon_in_the_run(bundle, tmp_path):
    run = tmp_path / "run"
    privmed.train(bundle, run, epsilon=1.0, epochs=2, say=lambda s: None)
    audit = privmed.audit_membership(run, bundle, shadows=2, max_examples=200)
    m = audit["membership"]
    assert m["claimed_epsilon"] == pytest.approx(
        json.loads((run / "results.json").read_text())["privacy"]["epsilon"], rel=1e-6)
    assert m["eps_lb"] >= 0 and m["consistent"]  # the attack cannot beat a true claim
    saved = json.loads((run / "results.json").read_text())
    assert saved["audit"]["membership"]["eps_lb"] == m["eps_lb"]
    assert "Membership" in (run / "report.html").read_text()


def test_audit_inversion_rebuilds_a_plain_update_better_than_a_dp_one(bundle, tmp_path):
    result = privmed.audit_inversion(bundle, out=tmp_path / "inv", batch_sizes=[1],
                                     scenarios=["plain", "dp"], steps=150,
                                     noise_multiplier=1.0)
    rows = {r["scenario"]: r for r in result["inversion"]["rows"]}
    assert rows["plain"]["psnr_mean"] > rows["dp"]["psnr_mean"]
    assert (tmp_path / "inv" / "inversion.png").stat().st_mode & 0o077 == 0
    assert json.loads((tmp_path / "inv" / "inversion.json").read_text()) == result
    with pytest.raises(ConfigError, match="no results.json"):
        privmed.audit_inversion(bundle, run=tmp_path, steps=1)


def test_deidentify_dicom_leaves_no_phi(bundle, tmp_path):
    from privmed.deid.samples import header_bytes, write_phi_folder

    split = bundle.test
    patients = write_phi_folder(tmp_path / "export", split.to_uint8()[:6],
                                split.labels[:6].numpy(), list(split.class_names))
    said = []
    report = privmed.deidentify_dicom(tmp_path / "export", tmp_path / "clean",
                                      tmp_path / "site.salt", shift_dates=True,
                                      say=said.append)
    assert report.counts["deidentified"] == 6 and not report.problems
    assert said and "Created a new salt" in said[0]
    blob = b"".join(header_bytes(p) for p in (tmp_path / "clean").rglob("*.dcm"))
    assert not [s for p in patients for s in p.phi_strings() if s.encode() in blob]
    assert report.log_path == tmp_path / "clean-deid-log.csv"


def test_anonymize_table_and_dp_table_stats(tmp_path):
    from privmed.tabular.synthetic import as_text, make_cohort

    table = as_text(make_cohort(400, 4000, seed=0).patients)
    csv = tmp_path / "patients.csv"
    table.to_csv(csv, index=False)
    released = privmed.anonymize_table(csv, 5, "age:numeric,sex,postcode",
                                       sensitive="diagnosis", l=2,
                                       drop=["name", "mrn", "birth_date"])
    assert released.report["k_achieved"] >= 5 and released.report["l_achieved"] >= 2
    assert (tmp_path / "patients.k5.csv").is_file()
    assert "name" not in released.table.columns
    ledger = tmp_path / "ledger.sqlite"
    stats = privmed.dp_table_stats(table, count=True, means={"age": (0, 100)},
                                   histograms={"sex": ["F", "M"]}, epsilon=1.0,
                                   ledger=ledger, budget_epsilon=1.2)
    assert stats["achieved_epsilon"] <= 1.0 + 1e-9
    assert stats["ledger"]["charged_epsilon"] == pytest.approx(stats["achieved_epsilon"])
    with pytest.raises(BudgetExceededError):  # a second release overspends 1.2
        privmed.dp_table_stats(table, count=True, epsilon=1.0, ledger=ledger)
