"""Federated nodes protect patients when their data names them: local DP-SGD per patient,
distributed-DP gradient shares clipped per patient, statistics one row per patient, δ
against patients, and the job's report says per patient only when every site does."""

from __future__ import annotations

import math

import pytest
import torch
from federation_kit import site_nodes

from privmed.data import split_sites
from privmed.data.dataset import DataBundle, ImageDataset
from privmed.federation import FederationConfig, InProcessTransport, SiteNode, run_federation
from privmed.federation.messages import state_to_arrays, trainable_keys
from privmed.federation.node.updates import clipped_gradient_share
from privmed.models import create_model

# the synthetic X-rays of the bundle fixture (tests/federation/conftest.py)
SYNTHETIC = dict(n_train=600, n_val=90, n_test=120, seed=5, images_per_patient=(1, 5))


def _job(**kw):
    base = dict(job_id="patients", model="scatter-linear", rounds=1, batch_size=64,
                epsilon=3.0, lr=0.05)
    return FederationConfig(**{**base, **kw})


def _without_patients(data: DataBundle) -> DataBundle:
    strip = [None if s is None else ImageDataset(s.images, s.labels, s.class_names, s.name)
             for s in (data.train, data.val, data.test)]
    return DataBundle(*strip, source=data.source, info=data.info)


@pytest.mark.slow  # in-process, but long: make test-fast leaves it out
def test_sites_train_per_patient_and_the_report_says_so(bundle, tmp_path):
    sites = split_sites(bundle, 2, seed=0)
    assert all(s.train.patient_ids is not None for s in sites)
    nodes = site_nodes(bundle, tmp_path, 2, first_id=3000, ledger=tmp_path / "ledger.sqlite")
    for node in nodes.values():
        assert (node.privacy_unit, node.num_units) == ("patient", node.bundle.train.num_patients)
        assert node.plan(_job(dp="local", secure_agg=False)).unit == "patient"
        assert node.delta(_job(dp="local", secure_agg=False)) < 1 / node.num_units
    result = run_federation(InProcessTransport(nodes), _job(dp="local", secure_agg=False),
                            bundle.test, tmp_path / "job", log=lambda _: None)
    assert result["privacy"]["unit"] == "patient"
    assert {r["unit"] for r in result["privacy"]["per_node"]} == {"patient"}
    # One site without patient ids makes the job's headline per image (the weakest).
    mixed = {4000: SiteNode(sites[0], ledger=tmp_path / "a.sqlite", budget_epsilon=10.0,
                            name="a"),
             4001: SiteNode(_without_patients(sites[1]), ledger=tmp_path / "b.sqlite",
                            budget_epsilon=10.0, name="b")}
    result = run_federation(InProcessTransport(mixed), _job(job_id="mixed", dp="local",
                                                            secure_agg=False),
                            bundle.test, tmp_path / "mixed", log=lambda _: None)
    assert result["privacy"]["unit"] == "image"


def _one_patient_node(n_images: int) -> SiteNode:
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(1, 1, 28, 28, generator=gen)
    images = torch.cat([image.repeat(n_images, 1, 1, 1), torch.rand(3, 1, 28, 28,
                                                                     generator=gen)])
    ids = ("big",) * n_images + ("x", "y", "z")
    train = ImageDataset(images, torch.tensor([0] * n_images + [1, 1, 0]),
                         ("normal", "pneumonia"), "one", ids)
    return SiteNode(DataBundle(train, source="one"), name="one")


@pytest.mark.parametrize("n_images", [1, 20])
def test_a_patients_distributed_dp_gradient_is_clipped_to_c(n_images):
    node = _one_patient_node(n_images)
    job = _job(max_grad_norm=0.1)
    model = create_model("scatter-linear", 1, 2, **job.model_kwargs((1, 28, 28)))
    arrays = state_to_arrays(model)
    keys = trainable_keys(model)
    # q = 1: every patient in; each patient's summed gradient is clipped to C, so the sum
    # has norm at most 4C (4 patients) and the big patient alone at most C.
    total, _ = clipped_gradient_share(node, job, arrays, keys, 1.0)
    assert total.norm().item() <= 4 * 0.1 * (1 + 1e-6)
    alone = SiteNode(DataBundle(node.bundle.train.subset(range(n_images)), source="a"))
    big, _ = clipped_gradient_share(alone, job, arrays, keys, 1.0)
    assert big.norm().item() <= 0.1 * (1 + 1e-6)
    assert big.norm().item() > 0.05  # clipped, not lost


def test_distributed_plan_counts_patients(bundle):
    site = split_sites(bundle, 2, seed=0)[0]
    node = SiteNode(site, name="p")
    plan = node.plan(_job())
    sigma, q, delta = plan.noise_multiplier, plan.sample_rate, plan.delta
    assert q == pytest.approx(64 / len(site.train))
    assert delta < 1 / site.train.num_patients
    assert math.isfinite(sigma)
