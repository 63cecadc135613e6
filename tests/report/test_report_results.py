"""results.json: validation, atomic writing, reading, NaN handling."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from report_samples import make_results

from privmed.errors import DataError
from privmed.report import (
    RESULTS_FILENAME,
    SCHEMA_VERSION,
    ResultsSchemaError,
    environment_info,
    read_results,
    validate_results,
    write_results,
)


def _strict_load(path):
    """Parse as strict JSON: NaN / Infinity literals are rejected."""
    def reject(token):
        raise ValueError(f"non-standard JSON constant {token}")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


@pytest.mark.parametrize("kind", ["binary", "multiclass", "nodp"])
def test_round_trip(tmp_path, kind):
    results = make_results(kind)
    path = write_results(tmp_path / "run", results)
    assert path == tmp_path / "run" / RESULTS_FILENAME
    assert _strict_load(path) == results
    assert read_results(tmp_path / "run") == results  # directory form
    assert read_results(path) == results  # file form
    assert path.read_text().startswith('{\n  "schema": "privmed.results/2"')  # pretty
    assert [p.name for p in path.parent.iterdir()] == [RESULTS_FILENAME]  # no temp left


def test_nan_and_numpy_values_are_written_as_json(tmp_path):
    results = make_results("binary")
    results["training"]["epochs"][0]["loss"] = float("nan")
    results["metrics"]["test"]["roc_auc"] = np.float32("nan")
    results["metrics"]["val"]["mcc"] = np.float32(0.5)
    results["metrics"]["val"]["confusion_matrix"] = np.array([[120, 30], [26, 124]])
    results["data"]["image_shape"] = (1, 28, 28)
    results["seed"] = np.int64(7)
    path = write_results(tmp_path, results)
    assert "NaN" not in path.read_text()
    loaded = _strict_load(path)
    assert loaded["training"]["epochs"][0]["loss"] is None
    assert loaded["metrics"]["test"]["roc_auc"] is None
    assert loaded["metrics"]["val"]["mcc"] == 0.5
    assert loaded["metrics"]["val"]["confusion_matrix"] == [[120, 30], [26, 124]]
    assert loaded["data"]["image_shape"] == [1, 28, 28]
    assert loaded["seed"] == 7 and isinstance(loaded["seed"], int)
    assert read_results(path)["metrics"]["test"]["roc_auc"] is None
    # The caller's dict is not modified.
    assert math.isnan(results["training"]["epochs"][0]["loss"])


def test_unknown_keys_are_kept(tmp_path):
    results = make_results("binary")
    results["audit"] = {"attack": "loss-threshold", "auc": 0.52}
    results["privacy"]["extra_note"] = "additive"
    loaded = read_results(write_results(tmp_path, results))
    assert loaded["audit"] == {"attack": "loss-threshold", "auc": 0.52}
    assert loaded["privacy"]["extra_note"] == "additive"


def _error(results) -> ResultsSchemaError:
    with pytest.raises(ResultsSchemaError) as info:
        validate_results(results)
    assert isinstance(info.value, DataError)
    message = str(info.value)
    assert message.endswith(".") and "\n" not in message
    assert info.value.key_path in message
    return info.value


def test_missing_privacy_epsilon():
    results = make_results("binary")
    del results["privacy"]["epsilon"]
    err = _error(results)
    assert err.key_path == "privacy.epsilon"
    assert "privacy.epsilon is missing" in str(err)


def test_private_run_needs_a_numeric_epsilon():
    results = make_results("binary")
    results["privacy"]["epsilon"] = None
    assert _error(results).key_path == "privacy.epsilon"
    results["privacy"]["epsilon"] = float("inf")
    assert _error(results).key_path == "privacy.epsilon"


@pytest.mark.parametrize(("entry", "path", "words"), [
    ({"noise_multiplier": 1.1, "sample_rate": 0.2}, "privacy.history[0].steps", "missing"),
    ({"noise_multiplier": 1.1, "sample_rate": 0.2, "steps": "50"},
     "privacy.history[0].steps", "must be an integer, got a string"),
    ({"noise_multiplier": 0.0, "sample_rate": 0.2, "steps": 50},
     "privacy.history[0].noise_multiplier", "above 0"),
    ({"noise_multiplier": 1.1, "sample_rate": 1.5, "steps": 50},
     "privacy.history[0].sample_rate", "at most 1"),
    ("50 steps", "privacy.history[0]", "must be an object"),
])
def test_bad_history_entries(entry, path, words):
    results = make_results("binary")
    results["privacy"]["history"] = [entry]
    err = _error(results)
    assert err.key_path == path
    assert words in str(err)


def test_second_history_entry_is_checked():
    results = make_results("binary")
    results["privacy"]["history"].append({"noise_multiplier": 1.1, "sample_rate": 0.2,
                                          "steps": -1})
    assert _error(results).key_path == "privacy.history[1].steps"


def test_wrong_and_future_schema_versions():
    results = make_results("binary")
    results["schema"] = "privmed.results/0"
    err = _error(results)
    assert err.key_path == "schema" and SCHEMA_VERSION in str(err)
    results["schema"] = "something-else"
    assert _error(results).key_path == "schema"
    del results["schema"]
    assert "schema is missing" in str(_error(results))
    results["schema"] = "privmed.results/3"
    err = _error(results)
    assert "newer" in str(err) and "upgrade privmed" in str(err)


def test_non_private_run_must_not_claim_an_epsilon():
    results = make_results("nodp")
    results["privacy"]["epsilon"] = 1.0
    assert _error(results).key_path == "privacy.epsilon"
    results = make_results("nodp")
    results["privacy"]["history"] = [{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 3}]
    assert _error(results).key_path == "privacy.history"


@pytest.mark.parametrize(("mutate", "path"), [
    (lambda r: r["metrics"]["val"].update(confusion_matrix=[[1, 2, 3], [4, 5, 6]]),
     "metrics.val.confusion_matrix"),
    (lambda r: r["metrics"]["val"].update(confusion_matrix=[[100, 50], [50, 99]]),
     "metrics.val.confusion_matrix"),  # counts 299 images, n is 300
    (lambda r: r["metrics"]["test"]["roc_curve"]["tpr"].pop(), "metrics.test.roc_curve"),
    (lambda r: r["metrics"]["test"].update(accuracy="0.8"), "metrics.test.accuracy"),
    (lambda r: r["training"]["epochs"][2].pop("seconds"), "training.epochs[2].seconds"),
    (lambda r: r["data"].update(classes=["only-one"]), "data.classes"),
    (lambda r: r["data"]["sizes"].pop("train"), "data.sizes.train"),
    (lambda r: r.update(seed=True), "seed"),
    (lambda r: r.update(created="yesterday"), "created"),
    (lambda r: r["privacy"]["ledger"].pop("remaining_epsilon"),
     "privacy.ledger.remaining_epsilon"),
    (lambda r: r["privacy"]["epsilon_curve"][1].update(steps=1.5),
     "privacy.epsilon_curve[1].steps"),
    (lambda r: r["environment"].pop("torch"), "environment.torch"),
    (lambda r: r.pop("model"), "model"),
])
def test_validator_names_the_bad_key(mutate, path):
    results = make_results("binary")
    mutate(results)
    assert _error(results).key_path == path


def test_values_json_cannot_hold_are_rejected_with_their_path():
    results = make_results("binary")
    results["training"]["config"]["device"] = object()
    assert _error(results).key_path == "training.config.device"


def test_invalid_results_are_not_written(tmp_path):
    results = make_results("binary")
    del results["privacy"]["delta"]
    with pytest.raises(DataError, match=r"privacy\.delta"):
        write_results(tmp_path, results)
    assert list(tmp_path.iterdir()) == []


def test_read_errors_are_one_sentence_data_errors(tmp_path):
    with pytest.raises(DataError, match="No results file at") as info:
        read_results(tmp_path)
    assert str(tmp_path / RESULTS_FILENAME) in str(info.value)

    path = tmp_path / RESULTS_FILENAME
    path.write_text('{"schema": "privmed.results/1", "seed": ')
    with pytest.raises(DataError, match="is not valid JSON") as info:
        read_results(tmp_path)
    assert str(path) in str(info.value)

    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match=re.escape(str(path))):
        read_results(path)

    path.write_text("[1, 2, 3]")
    with pytest.raises(DataError, match="must be a JSON object"):
        read_results(path)

    future = make_results("binary")
    future["schema"] = "privmed.results/3"
    path.write_text(json.dumps(future))
    with pytest.raises(DataError, match="upgrade privmed") as info:
        read_results(path)
    assert str(path) in str(info.value)

    broken = make_results("binary")
    del broken["privacy"]["epsilon"]
    path.write_text(json.dumps(broken))
    with pytest.raises(DataError, match=r"privacy\.epsilon is missing"):
        read_results(path)


def test_overwrite_is_atomic_and_complete(tmp_path):
    first = make_results("binary")
    write_results(tmp_path, first)
    second = make_results("nodp")
    write_results(tmp_path, second)
    assert read_results(tmp_path) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == [RESULTS_FILENAME]


def test_missing_run_directory_names_the_expected_file(tmp_path):
    with pytest.raises(DataError, match="No results file at") as info:
        read_results(tmp_path / "no-such-run")
    assert str(tmp_path / "no-such-run" / RESULTS_FILENAME) in str(info.value)


def test_documented_example_validates():
    doc = (Path(__file__).parents[2] / "docs" / "results-schema.md").read_text()
    example = re.search(r"## Example\n\n```json\n(.*?)```", doc, re.S).group(1)
    validate_results(json.loads(example))


def test_environment_info():
    env = environment_info()
    assert set(env) >= {"python", "platform", "torch", "opacus", "numpy", "privmed"}
    assert env["python"].count(".") == 2
    assert env["numpy"] == np.__version__
    assert all(v is None or isinstance(v, str) for v in env.values())
