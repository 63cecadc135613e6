"""``privmed data inspect`` refuses a split sharing patients, ``--resplit-by-patient`` repairs
it, and ``privmed data split`` keeps every patient at one site (real subprocesses)."""

from __future__ import annotations

from pathlib import Path

from cli_run import assert_one_sentence_error, privmed
from patient_data import leaky_npz

from privmed.data import load_data
from privmed.data.medmnist import read_npz_splits
from privmed.data.patients import shared_patients


def test_inspect_refuses_shared_patients_then_resplits_and_split_keeps_them(tmp_path: Path):
    leaky = leaky_npz(tmp_path / "leaky.npz", shared=4)
    proc = privmed("data", "inspect", str(leaky))
    assert_one_sentence_error(proc, 2, "4 patient(s)", "train and test", "--resplit-by-patient")
    assert proc.stderr.count(". ") == 0  # one sentence (paths end in '.npz', not '. ')

    fixed = tmp_path / "fixed.npz"
    proc = privmed("data", "inspect", str(leaky), "--resplit-by-patient", "--out", str(fixed),
                   "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert "4 patient(s) were in two splits, none is now" in proc.stdout
    assert "images per training patient on average, up to" in proc.stdout
    bundle = load_data(fixed)  # loads: no patient is in two splits any more
    assert not shared_patients(bundle.splits())
    assert sum(len(ds) for ds in bundle.splits().values()) == 360

    sites_dir = tmp_path / "sites"
    proc = privmed("data", "split", str(fixed), "--sites", "3", "--scheme", "dirichlet",
                   "--alpha", "0.5", "--out", str(sites_dir))
    assert proc.returncode == 0, proc.stderr
    assert "no patient has images at two sites" in proc.stdout
    owners: dict[str, set[int]] = {}
    for i in range(1, 4):
        for ds in read_npz_splits(sites_dir / f"site-{i}.npz").values():
            assert ds.patient_ids is not None  # the site files keep the patients
            for p in ds.patient_ids:
                owners.setdefault(p, set()).add(i)
    assert owners and all(len(at) == 1 for at in owners.values())
    test_ids = set(read_npz_splits(sites_dir / "test.npz")["test"].patient_ids)
    assert not test_ids & set(owners)


def test_out_without_resplit_is_refused(tmp_path: Path):
    proc = privmed("data", "inspect", "synthetic", "--out", str(tmp_path / "x.npz"))
    assert_one_sentence_error(proc, 2, "--resplit-by-patient")
    proc = privmed("data", "inspect", "synthetic", "--resplit-by-patient", "--out",
                   str(tmp_path / "x.npz"))
    assert_one_sentence_error(proc, 2, "names no patients")
