"""The CSPRNG behind every DP release (privmed.privacy.noise): its distributions, that no
seed of 32 (or any user-chosen) bits reproduces its noise, and that no DP code path draws
noise or Poisson samples from a Mersenne Twister (torch, numpy, random)."""

from __future__ import annotations

import copy
import math
import pickle
import re
import secrets
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

import privmed
from privmed.data import make_synthetic, split_sites
from privmed.federation import FederationConfig, SiteNode
from privmed.federation.messages import VECTOR_SCALE, state_to_arrays, trainable_keys
from privmed.federation.node.updates import node_statistics, noisy_gradient
from privmed.models import create_model
from privmed.privacy import SecureRandom
from privmed.privacy import noise as noise_module
from privmed.privacy.dpsgd import SecurePoissonSampler

# Tests below are random by design (nothing may seed the sampler): thresholds are set so a
# correct sampler fails one only with probability ~1e-4.
P_MIN = 1e-4

# ----------------------------------------------------------------------------- sampler


def test_gaussian_passes_normality_tests_with_the_right_variance():
    sigma, n = 3.0, 100_000
    z = SecureRandom().gaussian(n, sigma, dtype=torch.float64).numpy()
    assert stats.kstest(z / sigma, "norm").pvalue > P_MIN  # fully specified N(0, 1)
    assert stats.normaltest(z).pvalue > P_MIN  # D'Agostino-Pearson: skew and kurtosis
    assert stats.shapiro(z[:5000]).pvalue > P_MIN  # Shapiro-Wilk is exact up to 5000
    assert np.var(z) == pytest.approx(sigma ** 2, rel=0.03)  # 6.7 standard errors
    assert abs(z.mean()) < 4.5 * sigma / math.sqrt(n)


def test_gaussian_follows_the_reference_tensor():
    rng = SecureRandom()
    ref = torch.zeros(3, 4, dtype=torch.float16)
    noise = rng.gaussian_like(ref, 0.5)
    assert noise.shape == (3, 4) and noise.dtype == torch.float16 and noise.device == ref.device
    assert torch.equal(rng.gaussian((2, 2), 0.0), torch.zeros(2, 2))
    assert rng.gaussian(1, 1.0).shape == (1,)
    with pytest.raises(ValueError):
        rng.gaussian(3, float("nan"))


def test_each_value_sums_four_box_muller_normals_from_four_pairs(monkeypatch):
    """Opacus's secure_mode counter-measure (arXiv:2107.10138, 5.1): (z1+z2+z3+z4) / 2."""
    rng = SecureRandom()
    n = 3
    u = torch.tensor(np.random.default_rng(0).random(4 * n))  # known uniforms, test only
    monkeypatch.setattr(rng, "uniform", lambda k, device=None: u.clone())
    got = rng.gaussian(n, 2.0, dtype=torch.float64)
    r = torch.sqrt(-2 * torch.log(1 - u[:2 * n]))
    angle = 2 * math.pi * u[2 * n:]
    cos, sin = r * torch.cos(angle), r * torch.sin(angle)
    for j in range(n):
        pairs = [j, n + j, (j - 1) % n, n + (j - 1) % n]  # four different (u1, u2) pairs
        assert len(set(pairs)) == 4
        expected = (cos[j] + cos[n + j] + sin[pairs[2]] + sin[pairs[3]]) / 2 * 2.0
        assert got[j].item() == pytest.approx(expected.item(), rel=1e-12)


def test_uniforms_have_53_random_bits():
    u = SecureRandom().uniform(200_000).numpy()
    assert ((u >= 0) & (u < 1)).all()
    k = u * 2.0 ** 53
    assert (k == np.floor(k)).all()  # on the 2^-53 grid
    k = k.astype(np.uint64)
    for bit in (0, 1, 26, 52):  # the lowest and highest of the 53 bits are fair coins
        ones = int(((k >> np.uint64(bit)) & np.uint64(1)).sum())
        assert stats.binomtest(ones, len(k), 0.5).pvalue > P_MIN


@pytest.mark.parametrize("q", [0.0, 0.037, 1.0])
def test_bernoulli_rate_is_q(q):
    n = 100_000
    chosen = SecureRandom().bernoulli(n, q)
    k = int(chosen.sum())
    if q in (0.0, 1.0):
        assert k == q * n
    else:
        assert stats.binomtest(k, n, q).pvalue > P_MIN


def test_poisson_sampler_draws_each_record_with_probability_q():
    sampler = SecurePoissonSampler(num_samples=500, sample_rate=0.1, steps=200,
                                   rng=SecureRandom())
    batches = list(sampler)
    assert len(batches) == len(sampler) == 200
    counts = np.zeros(500)
    for batch in batches:
        assert batch == sorted(set(batch))
        counts[batch] += 1
    assert stats.binomtest(int(counts.sum()), 500 * 200, 0.1).pvalue > P_MIN
    # every record independently: its count is Binomial(200, 0.1), so the dispersion
    # statistic is chi-square with 500 degrees of freedom
    dispersion = float(((counts - 20) ** 2).sum() / 18)
    tail = stats.chi2(500).sf(dispersion)
    assert P_MIN < tail < 1 - P_MIN


def test_streams_never_repeat_and_ignore_every_seed():
    torch.manual_seed(0)
    np.random.seed(0)
    a = SecureRandom()
    first = a.words(8)
    torch.manual_seed(0)
    np.random.seed(0)
    b = SecureRandom()
    assert not torch.equal(first, b.words(8))  # same seeds everywhere, different keys
    assert not torch.equal(first, a.words(8))  # the same key never reuses a nonce


def test_the_key_never_leaves_memory(tmp_path):
    rng = SecureRandom()
    for leak in (lambda: pickle.dumps(rng), lambda: copy.deepcopy(rng),
                 lambda: torch.save({"rng": rng}, tmp_path / "checkpoint.pt")):
        with pytest.raises(TypeError, match="never pickled"):
            leak()
    assert "key" not in repr(rng).replace("256-bit key from the OS", "")


def test_a_forked_child_gets_a_new_key(monkeypatch):
    rng = SecureRandom()
    rng.words(4)
    key = rng._key
    monkeypatch.setattr(noise_module.os, "getpid", lambda: -1)  # as in a fork's child
    rng.words(4)
    assert rng._key != key and rng._nonce == 1


# ----------------------------------------------------------------------------- attack

def test_torch_generators_keep_only_32_bits_of_a_seed():
    """Why no torch generator may produce DP noise, however it is seeded."""
    seed = secrets.randbits(63)
    a = torch.normal(0.0, 1.0, (8,), generator=torch.Generator().manual_seed(seed))
    b = torch.normal(0.0, 1.0, (8,), generator=torch.Generator().manual_seed(seed % 2 ** 32))
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def bundle():
    return make_synthetic(n_train=300, n_val=30, n_test=10, seed=5)


def _job(job_id: str, **kw) -> FederationConfig:
    return FederationConfig(**{"job_id": job_id, "model": "scatter-linear", "rounds": 2,
                               "batch_size": 16, "epsilon": 3.0, "lr": 0.05, **kw})


def _node(bundle, path: Path, name: str) -> SiteNode:
    return SiteNode(split_sites(bundle, 2, seed=0)[0], ledger=path / f"{name}.sqlite",
                    budget_epsilon=50.0, name=name)


def _exact_statistics(node: SiteNode) -> np.ndarray:
    images = node.bundle.train.images.clamp(0, 1)
    per_image = torch.cat([images.mean(dim=(2, 3)), (images ** 2).mean(dim=(2, 3)),
                           torch.ones(images.shape[0], 1)], dim=1).double()
    return per_image.sum(dim=0).numpy()


def _brute_force_seed(noise: np.ndarray, std: float, seeds: range) -> int | None:
    """The reviewed attack: replay torch's generator for every seed, compare the noise."""
    target = torch.from_numpy(noise)
    for seed in seeds:
        guess = torch.normal(0.0, std, target.shape, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(seed))
        if torch.allclose(guess, target, rtol=0, atol=1e-6):
            return seed
    return None


def test_seed_brute_force_recovers_old_noise_but_not_a_released_statistic(bundle, tmp_path):
    seeds = range(2 ** 12)  # the attack's search space, cut from 2^32 to keep the test fast
    job = _job("stats", normalize=True, norm_noise_multiplier=1.0)
    std = job.norm_noise_multiplier * math.sqrt(3)  # plain aggregation: the whole noise
    # Positive control: noise as the old code drew it, from a 63-bit seed whose low 32 bits
    # fall inside the search space, is recovered exactly.
    planted = (secrets.randbits(31) << 32) | secrets.randbelow(len(seeds))
    old = torch.normal(0.0, std, (3,), dtype=torch.float64,
                       generator=torch.Generator().manual_seed(planted)).numpy()
    assert _brute_force_seed(old, std, seeds) == planted % 2 ** 32
    # The release: same global seeds before both nodes answer, different noise, no seed.
    noises = []
    for name in ("a", "b"):
        node = _node(bundle, tmp_path, name)
        torch.manual_seed(0)
        np.random.seed(0)
        reply = node_statistics(node, job, None)
        assert reply.status == "ok", reply.reason
        noises.append(reply.arrays["stats"] * VECTOR_SCALE - _exact_statistics(node))
    assert not np.allclose(noises[0], noises[1])
    for noise in noises:
        assert _brute_force_seed(noise, std, seeds) is None
        assert np.abs(noise).max() < 6 * std and np.abs(noise).max() > 1e-3


_TORCH_DRAWS = ("normal", "randn", "rand", "randint", "randperm", "bernoulli")


def test_distributed_gradient_noise_and_sampling_ignore_torch(bundle, tmp_path, monkeypatch):
    """Same global seed, same model: two nodes' gradient shares differ; neither drew from
    torch's generator functions (model initialisation, which uses none of them, may)."""
    job = _job("grad", normalize=False)
    model = create_model(job.model, 1, 2, image_size=[28, 28])
    arrays, keys = state_to_arrays(model), trainable_keys(model)

    def forbid(*args, **kwargs):
        raise AssertionError("a DP release drew from torch's generator")

    for name in _TORCH_DRAWS:
        monkeypatch.setattr(torch, name, forbid)
    vectors = []
    for name in ("a", "b"):
        torch.manual_seed(0)
        reply = noisy_gradient(_node(bundle, tmp_path, name), job, 1, arrays, 2, keys)
        assert reply.status == "ok", reply.reason
        vectors.append(reply.arrays["grad"])
    monkeypatch.undo()
    assert vectors[0].shape == vectors[1].shape
    assert not np.allclose(vectors[0][:-1], vectors[1][:-1])


# ----------------------------------------------------------------------------- static scan

SRC = Path(privmed.__file__).parent
# Calls that draw from or seed a Mersenne Twister (torch, numpy, Python's random) or make
# a short seed from secrets.
PATTERN = re.compile(r"manual_seed\(|torch\.Generator\(|torch\.(normal|randn|rand|randint|"
                     r"randperm|bernoulli)\(|\.(normal_|uniform_|bernoulli_)\(|np\.random|"
                     r"default_rng\(|^\s*(import|from) random\b|\brandom\.\w+\(|randbits\(")
# Modules that produce DP releases: only these exact lines may match, none feeding noise.
DP_PATHS = {
    "privacy/noise.py": set(), "privacy/dpsgd.py": set(), "privacy/accounting.py": set(),
    "privacy/config.py": set(), "privacy/ledger.py": set(), "privacy/__init__.py": set(),
    "federation/node/updates.py": set(), "federation/node/site.py": set(),
    "federation/node/handler.py": set(), "privacy/clipping.py": set(),
    "tabular/dpstats.py": set(),  # OpenDP's samplers: its own CSPRNG (CTR-DRBG, getrandom)
    "training/fit.py": {
        "torch.manual_seed(config.seed)",  # initialisation and the model's own layers
        "shuffle = torch.Generator().manual_seed(config.seed)",  # plain (non-DP) order only
    },
}
# Other modules: seeded randomness that no DP release draws its noise or sampling from.
NON_DP = {
    "data/synthetic.py": "synthetic images",
    "data/partition.py": "splits and sites",
    "data/patients.py": "patient hold-outs and generated patient ids for benchmarks",
    "deid/samples.py": "sample DICOM pixels",
    "tabular/synthetic.py": "synthetic tables",
    "tabular/linkage.py": "picks attack targets; its DP answers are OpenDP's",
    "federation/coordinator/loop.py": "the global model's initialisation",
    "audit/inversion.py": "attack harness: simulated noise, never released",
    "audit/membership.py": "attack harness: shadow splits and initialisation",
    "audit/epsilon.py": "bootstrap of the audit's bounds",
    "encrypted/calibration.py": "inputs that calibrate the CKKS ranges",
}


def _matches(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines()
            if PATTERN.search(line) and not line.strip().startswith("#")]


def test_no_dp_code_path_draws_from_a_mersenne_twister():
    seen = set()
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        found = _matches(path)
        if rel in DP_PATHS:
            seen.add(rel)
            unexpected = [line for line in found if line not in DP_PATHS[rel]]
            assert not unexpected, f"{rel} draws DP randomness from a seeded PRNG: {unexpected}"
        elif found:
            assert rel in NON_DP, (f"{rel} uses a seeded PRNG ({found[0]}); if no DP release "
                                   "draws from it, add it to NON_DP with the reason")
    assert seen == set(DP_PATHS)  # the scan saw every DP module (none renamed away)
