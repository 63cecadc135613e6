"""``results.json``: the documented, versioned record of one run.

Training builds a plain dict and hands it to :func:`write_results`; users and
later features script against the file (see ``docs/results-schema.md``). The
validator is hand-written so that every problem names its key path
(``privacy.history[0].steps``) in one sentence, without a jsonschema dependency.
Unknown keys are allowed everywhere: additive changes keep the major version.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import platform
import re
import tempfile
from collections.abc import Mapping
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from privmed.errors import DataError

SCHEMA_VERSION = "privmed.results/2"
# /2: binary metrics are at a stated positive class and operating point (threshold), with
# CIs; multi-class sensitivity/specificity are null. /1 files are still read and rendered.
READABLE_VERSIONS = ("privmed.results/1", SCHEMA_VERSION)
RESULTS_FILENAME = "results.json"

_SCHEMA_RE = re.compile(r"^privmed\.results/(\d+)$")
_MISSING = object()


class ResultsSchemaError(DataError):
    """Results that do not follow the schema; ``key_path`` names the offending key."""

    def __init__(self, message: str, key_path: str) -> None:
        super().__init__(message)
        self.key_path = key_path


class _Violation(Exception):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path} {problem}")
        self.path, self.problem = path, problem


# --------------------------------------------------------------------------- JSON coercion

def _jsonable(value: Any, path: str) -> Any:
    """A JSON-ready deep copy: numpy/torch scalars and arrays become Python values,
    tuples lists, paths strings, and NaN/inf become null so the file stays valid JSON."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _Violation(path or "the results", f"has a non-string key {key!r}")
            out[key] = _jsonable(item, _join(path, key))
        return out
    if isinstance(value, list | tuple):
        return [_jsonable(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return _jsonable(value.tolist(), path)
    raise _Violation(path or "the results",
                     f"holds a {type(value).__name__}, which JSON cannot represent")


# --------------------------------------------------------------------------- checking helpers

def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _get(obj: dict, key: str, path: str, required: bool) -> Any:
    if key not in obj:
        if required:
            raise _Violation(_join(path, key), "is missing")
        return _MISSING
    return obj[key]


def _field(obj: dict, key: str, path: str, kind: str, *, null: bool = False,
           required: bool = True, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False) -> Any:
    """Look up ``obj[key]`` and check it is of ``kind`` (str/int/num/bool/dict/list).

    Returns the value, or None when optional and absent. ``lo``/``hi`` bound numbers.
    """
    p = _join(path, key)
    value = _get(obj, key, path, required)
    if value is _MISSING or (value is None and null):
        return None
    ok = {
        "str": isinstance(value, str) and value != "",
        "int": isinstance(value, int) and not isinstance(value, bool),
        "num": isinstance(value, int | float) and not isinstance(value, bool)
        and math.isfinite(value),
        "bool": isinstance(value, bool),
        "dict": isinstance(value, dict),
        "list": isinstance(value, list),
    }[kind]
    if not ok:
        wanted = {"str": "a non-empty string", "int": "an integer", "num": "a finite number",
                  "bool": "true or false", "dict": "an object", "list": "a list"}[kind]
        if null:
            wanted += " or null"
        raise _Violation(p, f"must be {wanted}, got {_describe(value)}")
    if kind in ("int", "num"):
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise _Violation(p, f"must be {'above' if lo_open else 'at least'} {lo:g}, "
                                f"got {value:g}")
        if hi is not None and value > hi:
            raise _Violation(p, f"must be at most {hi:g}, got {value:g}")
    return value


def _items(obj: dict, key: str, path: str, *, required: bool = True, null: bool = False
           ) -> list[tuple[str, dict]]:
    """A list of objects under ``key`` as (path, object) pairs."""
    values = _field(obj, key, path, "list", required=required, null=null) or []
    out = []
    for i, item in enumerate(values):
        p = f"{_join(path, key)}[{i}]"
        if not isinstance(item, dict):
            raise _Violation(p, f"must be an object, got {_describe(item)}")
        out.append((p, item))
    return out


# --------------------------------------------------------------------------- sections

def _check_schema_version(value: Any) -> str | None:
    """None when ``value`` is this schema, else the problem in words."""
    if value in READABLE_VERSIONS:
        return None
    match = _SCHEMA_RE.match(value) if isinstance(value, str) else None
    if match and int(match.group(1)) > int(SCHEMA_VERSION.rsplit("/", 1)[1]):
        return (f"uses schema '{value}', newer than the {SCHEMA_VERSION} this privmed "
                "understands; upgrade privmed to read it")
    return f"is {json.dumps(value)}, expected '{SCHEMA_VERSION}'"


def _check_data(d: dict) -> list[str]:
    data = _field(d, "data", "", "dict")
    _field(data, "source", "data", "str")
    _field(data, "dataset_id", "data", "str")
    classes = _field(data, "classes", "data", "list")
    for i, name in enumerate(classes):
        if not isinstance(name, str):
            raise _Violation(f"data.classes[{i}]", f"must be a string, got {_describe(name)}")
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise _Violation("data.classes", "must list at least two distinct class names")
    shape = _field(data, "image_shape", "data", "list")
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                  for s in shape):
        raise _Violation("data.image_shape", "must be three positive integers [C, H, W]")
    sizes = _field(data, "sizes", "data", "dict")
    # A federated run under secure aggregation never learns the sites' image counts: the
    # train size is then null and named in data.sizes_hidden, never a made-up number.
    hidden = _field(data, "sizes_hidden", "data", "list", required=False) or []
    _field(sizes, "train", "data.sizes", "int", lo=1, null="train" in hidden)
    for split in sizes:
        _field(sizes, split, "data.sizes", "int", null=True, lo=0)
    return classes


def _check_training(d: dict) -> None:
    training = _field(d, "training", "", "dict")
    _field(training, "config", "training", "dict")
    _field(training, "seconds", "training", "num", lo=0)
    for p, epoch in _items(training, "epochs", "training"):
        _field(epoch, "epoch", p, "int", lo=1)
        _field(epoch, "steps", p, "int", lo=0)
        _field(epoch, "loss", p, "num", null=True)
        _field(epoch, "val_auc", p, "num", null=True, lo=0, hi=1)
        _field(epoch, "val_accuracy", p, "num", null=True, lo=0, hi=1)
        _field(epoch, "epsilon", p, "num", null=True, lo=0)
        _field(epoch, "seconds", p, "num", lo=0)


def _check_privacy(d: dict) -> None:
    privacy = _field(d, "privacy", "", "dict")
    enabled = _field(privacy, "enabled", "privacy", "bool")
    for key in ("epsilon", "delta", "accountant", "history"):
        _get(privacy, key, "privacy", required=True)
    if enabled:
        _field(privacy, "epsilon", "privacy", "num", lo=0)
        _field(privacy, "delta", "privacy", "num", lo=0, hi=1, lo_open=True)
        _field(privacy, "accountant", "privacy", "str")
    else:
        # A non-private run must not look private to anyone scripting against it.
        for key in ("epsilon", "delta", "accountant"):
            if privacy[key] is not None:
                raise _Violation(f"privacy.{key}", "must be null when privacy.enabled is false")
        if privacy["history"] != []:
            raise _Violation("privacy.history", "must be empty when privacy.enabled is false")
    # Required for private runs; optional (and usually null) for non-private ones.
    _field(privacy, "target_epsilon", "privacy", "num", null=True, required=enabled,
           lo=0, lo_open=True)
    # Under secure aggregation the coordinator never learns a node's sigma or q (they
    # would give its image count away): a federated run may leave them null.
    hidden = not enabled or "per_node" in privacy
    _field(privacy, "noise_multiplier", "privacy", "num", null=hidden, required=enabled,
           lo=0, lo_open=True)
    _field(privacy, "max_grad_norm", "privacy", "num", null=not enabled, required=enabled,
           lo=0, lo_open=True)
    _field(privacy, "sample_rate", "privacy", "num", null=hidden, required=enabled,
           lo=0, hi=1, lo_open=True)
    for p, entry in _items(privacy, "history", "privacy"):
        _field(entry, "noise_multiplier", p, "num", lo=0, lo_open=True)
        _field(entry, "sample_rate", p, "num", lo=0, hi=1, lo_open=True)
        _field(entry, "steps", p, "int", lo=0)
    for p, point in _items(privacy, "epsilon_curve", "privacy", required=enabled,
                           null=not enabled):
        _field(point, "steps", p, "int", lo=0)
        _field(point, "epsilon", p, "num", null=True, lo=0)
    ledger = _field(privacy, "ledger", "privacy", "dict", null=True, required=enabled)
    if ledger is not None:
        _field(ledger, "path", "privacy.ledger", "str")
        _field(ledger, "dataset_id", "privacy.ledger", "str")
        for key in ("budget_epsilon", "spent_epsilon", "remaining_epsilon"):
            _field(ledger, key, "privacy.ledger", "num")


def _check(d: Any) -> None:
    if not isinstance(d, dict):
        raise _Violation("the results", f"must be a JSON object, got {_describe(d)}")
    problem = _check_schema_version(_get(d, "schema", "", required=True))
    if problem:
        raise _Violation("schema", problem)
    _field(d, "privmed_version", "", "str")
    created = _field(d, "created", "", "str")
    try:
        datetime.fromisoformat(created)
    except ValueError:
        raise _Violation("created", f"must be an ISO 8601 time, got {created!r}") from None
    _field(d, "command", "", "str", null=True, required=False)
    _field(d, "run_id", "", "str", null=True, required=False)
    _field(d, "seed", "", "int")
    classes = _check_data(d)
    model = _field(d, "model", "", "dict")
    _field(model, "name", "model", "str")
    _field(model, "parameters", "model", "int", lo=0)
    _check_training(d)
    _check_privacy(d)
    from privmed.report.metrics_schema import check_metrics, check_operating_point

    check_metrics(d, classes)
    check_operating_point(d, classes)
    from privmed.report.external import check_external_tests

    check_external_tests(d, classes)
    env = _field(d, "environment", "", "dict")
    for key in ("python", "platform", "torch", "opacus", "numpy", "privmed"):
        _field(env, key, "environment", "str", null=True)


# --------------------------------------------------------------------------- public API

def _validated(results: Any, subject: str) -> dict:
    """JSON-ready copy of ``results``, or ResultsSchemaError mentioning ``subject``."""
    try:
        clean = _jsonable(results, "")
        _check(clean)
    except _Violation as v:
        if v.path == "schema" and v.problem.startswith("uses schema"):
            message = f"{subject} {v.problem}."
        else:
            message = f"{subject} does not follow {SCHEMA_VERSION}: {v.path} {v.problem}."
        raise ResultsSchemaError(message, v.path) from None
    return clean


def validate_results(results: Any) -> None:
    """Raise :class:`ResultsSchemaError` (a DataError) naming the first bad key path."""
    _validated(results, "The results dict")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace``, so readers
    never see a half-written file."""
    path = Path(path)
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent,
                                         prefix=f".{path.name}.", suffix=".tmp",
                                         delete=False) as tmp:
            tmp_name = tmp.name
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException as e:  # an interrupt, too, must not leave the temporary file
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise DataError(f"Could not write {path}: {e.strerror or e}.") from None
        raise


def write_results(run_dir: str | os.PathLike[str], results: dict) -> Path:
    """Validate ``results`` and write ``run_dir/results.json`` atomically; returns its path.

    numpy/torch values are converted and NaN/inf written as null.
    """
    clean = _validated(results, "The results dict")
    path = Path(run_dir) / RESULTS_FILENAME
    atomic_write_text(path, json.dumps(clean, indent=2, ensure_ascii=False,
                                       allow_nan=False) + "\n")
    return path


def results_path(run_dir_or_file: str | os.PathLike[str]) -> Path:
    """``run_dir/results.json`` for a run directory (existing or not, unless it names a
    ``.json`` file), else the file itself."""
    path = Path(run_dir_or_file)
    if path.is_dir() or (path.suffix != ".json" and not path.exists()):
        return path / RESULTS_FILENAME
    return path


def read_results(run_dir_or_file: str | os.PathLike[str]) -> dict:
    """Load and validate a results file, given it or the run directory holding it."""
    path = results_path(run_dir_or_file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"No results file at {path}; is this a privmed run directory?"
                        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"Could not read {path}: {getattr(e, 'strerror', None) or e}."
                        ) from None
    try:
        # Hand-edited files may hold NaN/Infinity: read them as null, as we write them.
        data = json.loads(text, parse_constant=lambda _: None)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: "
                        f"{e.msg}).") from None
    return _validated(data, str(path))


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment_info() -> dict:
    """Versions that matter for reproducing a run; a missing package maps to None."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": _version("torch"),
        "opacus": _version("opacus"),
        "numpy": _version("numpy"),
        "privmed": _version("privmed"),
    }
