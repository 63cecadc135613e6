"""Compiling models for CKKS and evaluating them in-process on real SEAL ciphertexts."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from privmed.encrypted.calibration import PRIVATE, calibration_images
from privmed.encrypted.ckks import SecretKeys, choose_params, max_modulus_bits
from privmed.encrypted.compiler import HEModel, compile_model
from privmed.encrypted.evaluate import EvaluationError, Evaluator
from privmed.encrypted.layout import pack_batch, pack_single
from privmed.errors import ConfigError, DataError
from privmed.models import create_model, load_model


@pytest.fixture(scope="module")
def session(compiled_he):
    he, _ = compiled_he
    keys = SecretKeys(he.params)
    ek = keys.evaluation_keys(rotations=True)
    evaluator = Evaluator(he)
    return he, keys, evaluator, evaluator.load_keys(ek["relin_keys"], ek["galois_keys"])


def test_parameters_are_128_bit_secure_with_depth_five(compiled_he):
    he, _ = compiled_he
    p = he.params
    assert p.depth == 5 and p.poly_modulus_degree == 8192
    assert sum(p.coeff_modulus_bits) <= max_modulus_bits(p.poly_modulus_degree)
    with pytest.raises(ConfigError, match="128-bit"):
        choose_params(depth=40)


def test_folded_weights_match_the_torch_model(trained_he_model, compiled_he, synthetic_bundle):
    net, _ = load_model(trained_he_model)
    he, _ = compiled_he
    images = synthetic_bundle.test.images[:32]
    with torch.no_grad():
        ref = net(images).double().numpy()
    assert np.abs(he.plain_logits(images.numpy()) - ref).max() < 1e-4


def test_single_encoding_agrees_and_returns_only_scores(session, synthetic_bundle):
    he, keys, evaluator, ek = session
    images = synthetic_bundle.test.images[:6].numpy()
    plain = he.plain_logits(images)
    score_slots = he.layout.score_slots()
    for image, ref in zip(images, plain, strict=True):
        result = evaluator.single(evaluator.load_input(keys.encrypt(
            pack_single(he.layout, image))), ek)
        slots = keys.decrypt(result)  # the whole response, every slot
        scores = slots[score_slots] * he.output_scale  # [class, block]: one copy per block
        assert np.abs(scores - ref[:, None]).max() < 0.05
        others = np.ones(slots.size, bool)
        others[score_slots.reshape(-1)] = False
        # masked: no partial sums, activations or weights anywhere else
        assert np.abs(slots[others]).max() < 1e-2 * max(1.0, np.abs(ref).max())
        error = np.abs(scores - ref[:, None]).max()
        margin = np.diff(np.sort(ref)[-2:])[0]
        if margin > 2 * error:  # CKKS is approximate: a near-tie may flip
            assert int(scores[:, 0].argmax()) == int(ref.argmax())


@pytest.mark.slow  # in-process, but long: make test-fast leaves it out
def test_batch_encoding_agrees_on_every_test_image(session, synthetic_bundle):
    he, keys, evaluator, ek = session
    images = synthetic_bundle.test.images.numpy()
    cts = [evaluator.load_input(keys.encrypt(row)) for row in pack_batch(images, he.params.slots)]
    results = evaluator.batch(cts, ek)
    enc = np.stack([keys.decrypt(r)[:len(images)] for r in results], 1) * he.output_scale
    plain = he.plain_logits(images)
    error = np.abs(enc - plain).max()
    assert error < 0.05
    # CKKS is approximate: the decision must agree wherever the plaintext margin is larger
    # than twice the measured error (a near-tie may flip, and no bound can prevent that)
    top2 = np.sort(plain, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * error
    assert clear.mean() > 0.9
    assert (enc.argmax(1) == plain.argmax(1))[clear].all()


def test_evaluator_rejects_foreign_and_malformed_inputs(session):
    he, keys, evaluator, _ = session
    with pytest.raises(EvaluationError, match="malformed"):
        evaluator.load_input(b"not a ciphertext")
    other = SecretKeys(choose_params(depth=5, scale_bits=25))  # other primes
    with pytest.raises(EvaluationError):
        evaluator.load_input(other.encrypt(np.zeros(8)))
    with pytest.raises(EvaluationError, match="relinearisation"):
        evaluator.load_keys(other.evaluation_keys(rotations=False)["relin_keys"], None)
    no_rot = evaluator.load_keys(keys.evaluation_keys(rotations=False)["relin_keys"], None)
    with pytest.raises(EvaluationError, match="Galois"):
        evaluator.single(evaluator.load_input(keys.encrypt(np.zeros(8))), no_rot)
    with pytest.raises(EvaluationError, match="784"):
        evaluator.batch([evaluator.load_input(keys.encrypt(np.zeros(8)))], no_rot)


def test_models_that_cannot_run_encrypted_are_refused_in_one_sentence(synthetic_bundle):
    info = {"image_shape": [1, 28, 28], "class_names": ["a", "b"], "meta": {}}
    calib = calibration_images(synthetic_bundle.train, 64)
    with pytest.raises(ConfigError, match=r"Layer \d \((Conv2d|GroupNorm|Tanh)\)"):
        compile_model(create_model("small-cnn", 1, 2), info, calib, source=PRIVATE)
    wide = create_model("he-cnn", 1, 2, image_size=[28, 28], hidden=100)
    with pytest.raises(ConfigError, match="hidden layer"):
        compile_model(wide, info, calib, source=PRIVATE)


def test_ranges_are_checked_and_the_head_rescaled(trained_he_model, synthetic_bundle, session):
    _, keys, _, _ = session
    net, info = load_model(trained_he_model)
    calib = calibration_images(synthetic_bundle.train, 256)
    loud = copy.deepcopy(net)
    with torch.no_grad():
        loud.head.weight.mul_(50.0)
        loud.head.bias.mul_(50.0)
    he, report = compile_model(loud, info, calib, source=PRIVATE)
    assert he.output_scale > 1 and report["ranges"]["output"]["max"] * 4 <= 16
    evaluator = Evaluator(he)
    ek = keys.evaluation_keys(rotations=True)
    session_keys = evaluator.load_keys(ek["relin_keys"], ek["galois_keys"])
    image = synthetic_bundle.test.images[0].numpy()
    got = keys.decrypt(evaluator.single(evaluator.load_input(
        keys.encrypt(pack_single(he.layout, image))), session_keys))
    logits = got[he.layout.class_offsets()] * he.output_scale
    assert np.abs(logits - he.plain_logits(image[None])[0]).max() < 0.5
    huge = copy.deepcopy(net)
    with torch.no_grad():
        huge.features[1].weight.mul_(1e9)
    with pytest.raises(ConfigError, match="reaches .* beyond what CKKS holds"):
        compile_model(huge, info, calib, source=PRIVATE)


def test_artefact_round_trips_and_rejects_other_files(compiled_he, tmp_path):
    he, path = compiled_he
    again = HEModel.load(path)
    assert again.card["class_names"] == he.card["class_names"]
    assert np.array_equal(again.fc1_w, he.fc1_w) and again.params == he.params
    bad = tmp_path / "bad.he"
    bad.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DataError, match="not a compiled privmed model"):
        HEModel.load(bad)
    with pytest.raises(DataError, match="does not exist"):
        HEModel.load(tmp_path / "missing.he")
