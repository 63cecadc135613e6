"""Site ledgers of ``federate`` / ``simulate`` live in one per-user folder, not inside
--out (issue 15, item 5): a second job on the same data with a new --out finds the first
one's spends and is refused when it would overspend. The folder holds one ledger for
every site, charged per record (issue 16): a shrunk copy of a site's data is refused too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from privmed.cli import app
from privmed.data import DataBundle, load_data, make_synthetic, save_npz, split_sites
from privmed.errors import BudgetExceededError, ConfigError
from privmed.federation import FederationConfig, InProcessTransport, SiteNode, run_federation
from privmed.federation.runtime.site_ledgers import site_ledgers
from privmed.privacy import BudgetLedger
from privmed.privacy.ledger_home import default_ledger_dir, ledger_file, ledger_for


def test_default_ledger_folder_is_the_xdg_data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_ledger_dir() == tmp_path / "xdg" / "privmed" / "ledgers"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for unset in (None, "relative/path"):  # the XDG spec ignores a relative value
        if unset is None:
            monkeypatch.delenv("XDG_DATA_HOME")
        else:
            monkeypatch.setenv("XDG_DATA_HOME", unset)
        assert default_ledger_dir() == tmp_path / "home" / ".local/share/privmed/ledgers"
    assert ledger_file(tmp_path) == tmp_path / "ledger.sqlite"
    # one file per folder, whatever the dataset (the ledger follows the records)
    assert ledger_for("0123456789abcdef", tmp_path) == tmp_path / "ledger.sqlite"


def _sites(tmp_path: Path, n_train: int = 100) -> tuple[list[Path], Path]:
    bundle = make_synthetic(n_train=n_train, n_val=0, n_test=30, seed=4)
    paths = [save_npz(part, tmp_path / "data" / f"site-{i}.npz")
             for i, part in enumerate(split_sites(bundle, 2, seed=0), start=1)]
    held = save_npz(DataBundle(train=bundle.test, source="test"),
                    tmp_path / "data" / "heldout.npz")
    return paths, held


def _job(job_id: str) -> FederationConfig:
    return FederationConfig(job_id=job_id, model="scatter-linear", rounds=1, local_epochs=1,
                            batch_size=64, epsilon=3.0, secure_agg=False, dp="local",
                            normalize=False, min_nodes=2)


def test_site_ledgers_are_keyed_to_the_data(tmp_path):
    paths, _ = _sites(tmp_path, n_train=40)
    ledgers = tmp_path / "ledgers"
    sites = site_ledgers(paths, _job("a"), ledgers, None)
    ids = [load_data(p).train.dataset_id for p in paths]
    assert [(s.name, s.ledger) for s in sites] == [
        ("site-1", ledgers / "ledger.sqlite"), ("site-2", ledgers / "ledger.sqlite")]
    # a first use sets 2 x epsilon; later jobs keep the budget the ledger holds
    assert [s.budget_epsilon for s in sites] == [6.0, 6.0]
    assert BudgetLedger(sites[0].ledger).budget(ids[0])["epsilon"] == 6.0
    assert [s.budget_epsilon for s in site_ledgers(paths, _job("b"), ledgers, None)] == [None,
                                                                                       None]
    # the ledgers and the nodes' stored replies stay with their owner
    assert ledgers.stat().st_mode & 0o077 == 0
    # two sites with the same images would share (and double-spend) one ledger
    with pytest.raises(ConfigError, match="site-1 and site-2 hold the same training images"):
        site_ledgers([paths[0], paths[0]], _job("c"), ledgers, None)
    # no DP, no ledger
    plain = FederationConfig(job_id="d", model="scatter-linear", dp="none", secure_agg=False)
    assert [s.ledger for s in site_ledgers(paths, plain, ledgers, None)] == [None, None]


def test_a_new_out_does_not_give_the_sites_a_fresh_budget(tmp_path, monkeypatch):
    paths, held = _sites(tmp_path)
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_DATA_HOME", str(xdg))
    # The first job, in this process: real nodes, real ledgers in the per-user folder.
    job = _job("first")
    sites = site_ledgers(paths, job, None, 4.0)
    nodes = {i: SiteNode(s.data, ledger=s.ledger, budget_epsilon=s.budget_epsilon, name=s.name)
             for i, s in enumerate(sites)}
    run_federation(InProcessTransport(nodes), job, load_data(held, val_fraction=0.0).train,
                   tmp_path / "first", log=lambda s: None)
    ids = [load_data(p).train.dataset_id for p in paths]
    for s, dataset in zip(sites, ids, strict=True):
        assert s.ledger == xdg / "privmed" / "ledgers" / "ledger.sqlite"
        assert [e["run_id"] for e in BudgetLedger(s.ledger).entries(dataset)] == [
            "first-round-1"]
        # the sites share the ledger, not their stored replies
        assert (s.ledger.parent / "ledger.sqlite.rounds" / dataset / "first" /
                "round-0001.pt").exists()

    # The same data again under a new --out, through the command (in process): refused
    # before any process starts, with the ledger's sentence (BudgetExceededError: exit 3),
    # the budget kept at 4 (a default budget of 2 x 3 would be refused as a change).
    second = tmp_path / "second"
    result = CliRunner().invoke(app, [
        "federate", "--site-data", str(paths[0]), "--site-data", str(paths[1]), "--heldout",
        str(held), "--dp", "local", "--no-secure-agg", "--rounds", "1", "--local-epochs", "1",
        "--batch-size", "64", "--epsilon", "3", "--out", str(second)],
        env={"COLUMNS": "200", "XDG_DATA_HOME": str(xdg)})
    assert isinstance(result.exception, BudgetExceededError), result.output
    assert result.exception.exit_code == 3
    message = str(result.exception)
    assert message.startswith(f"Refused for site-1 (ledger {sites[0].ledger}): with this run")
    assert "over its budget of 4.00" in message
    assert not (second / "nodes").exists() and not (second / "coordinator").exists()
    # The ledger follows the records: site-1's file minus one image is a new dataset id
    # (which would get a default budget of 6), yet its images already spent site-1's 4.
    with np.load(paths[0]) as z:
        arrays = {k: z[k][1:] if k.startswith("train_") else z[k] for k in z.files}
    shrunk = tmp_path / "data" / "site-1-minus-one.npz"
    np.savez(shrunk, **arrays)
    assert load_data(shrunk).train.dataset_id not in ids
    with pytest.raises(BudgetExceededError) as info:
        site_ledgers([shrunk, paths[1]], _job("third"), None, None)
    assert str(info.value).startswith(f"Refused for site-1 (ledger {sites[0].ledger}): "
                                      "with this run, ")
    assert "would exceed their budget" in str(info.value)
    assert "over its budget of 4.00" in str(info.value)
    book = BudgetLedger(sites[0].ledger)  # nothing was charged for the refused jobs
    assert sorted((e["dataset_id"], e["run_id"]) for e in book.entries()) == sorted(
        (dataset, "first-round-1") for dataset in ids)


def test_earlier_per_dataset_ledgers_are_imported_once(tmp_path):
    """A folder of ``<dataset id>.sqlite`` files (earlier versions) keeps its spends."""
    from privmed.privacy.ledger_home import shared_ledger

    folder = tmp_path / "ledgers"
    old_ids = ["0123456789abcdef", "fedcba9876543210"]
    for i, dataset in enumerate(old_ids):
        old = BudgetLedger(folder / f"{dataset}.sqlite")
        old.set_budget(dataset, 4.0, 1e-5, "rdp")
        old.reserve(dataset, "job-round-1", [(2.0, 0.05, 100 + i)])
        old.commit("job-round-1", [(2.0, 0.05, 100 + i)])
        replies = folder / f"{dataset}.sqlite.rounds" / "job"
        replies.mkdir(parents=True)
        (replies / "round-0001.pt").write_bytes(b"reply")
    path = shared_ledger(folder)
    assert path == folder / "ledger.sqlite"
    book = BudgetLedger(path)
    assert sorted((e["dataset_id"], e["steps"]) for e in book.entries()) == [
        (old_ids[0], 100), (old_ids[1], 101)]
    assert book.budget(old_ids[1])["epsilon"] == 4.0
    for dataset in old_ids:
        assert not (folder / f"{dataset}.sqlite").exists()
        assert (folder / f"{dataset}.sqlite.imported").exists()
        # a node of that dataset finds its stored replies where it looks for them now
        assert (folder / "ledger.sqlite.rounds" / dataset / "job" / "round-0001.pt"
                ).read_bytes() == b"reply"
    assert shared_ledger(folder) == path and len(BudgetLedger(path).entries()) == 2
