"""The audits as one call each (``privmed.audit_membership``, ``privmed.audit_inversion``):
attack, then keep the result where the run's reader looks, its results.json and report.

What ``privmed audit membership`` and ``privmed audit inversion`` do after parsing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from privmed.data import DataBundle, ImageDataset, load_data
from privmed.errors import ConfigError
from privmed.fileio import write_private_bytes

Progress = Callable[[int, int], None]


def save_audit(run: str | Path, section: dict) -> Path:
    """Merge ``section`` into the run's results.json ``audit`` and re-render its report;
    what was already there (training, other audits) is kept. Returns the report's path."""
    from privmed.report import read_results, write_report, write_results

    results = read_results(run)
    results["audit"] = {**(results.get("audit") or {}), **section}
    write_results(run, results)
    return write_report(run)


def audit_membership(run: str | Path, data: str | Path | DataBundle, *, shadows: int = 8,
                     online: bool = True, one_run: bool = False, canaries: int = 100,
                     unit: str = "auto", max_examples: int | None = None, seed: int = 0,
                     save: bool = True, progress: Progress | None = None) -> dict[str, Any]:
    """Attack a finished run's membership (LiRA with ``shadows`` shadow models, and LOSS)
    and put the measured ε lower bound next to the claimed ε.

    ``data``: what the run was trained on (a source or its DataBundle): its train split
    are the members, its val split (else test) the non-members. ``unit``: members are
    patients or images (``"auto"``: the run's privacy unit). ``one_run``: also the
    one-run canary audit (Steinke et al. 2023), which trains one more model with
    ``canaries`` canaries. ``save``: write the result into the run's results.json and
    report.html. Returns ``{"membership": {...}}`` (and ``"one_run"``): ``eps_lb``, the
    measured ε ≥, ``claimed_epsilon``, ``consistent``, and each attack's ROC-AUC and TPRs. ::

        audit = privmed.audit_membership("runs/x", "synthetic", shadows=8)
    """
    from privmed.audit.membership import audit_membership as attack
    from privmed.audit.membership import one_run_audit, read_recipe

    run = Path(run)
    bundle = data if isinstance(data, DataBundle) else load_data(data)
    result = attack(run, bundle, shadows=shadows, online=online, seed=seed,
                    max_examples=max_examples, unit=unit, progress=progress)
    if one_run:
        recipe = read_recipe(run, bundle)
        result.update(one_run_audit(bundle, model_name=recipe.name, config=recipe.config,
                                    privacy=recipe.privacy, canaries=canaries, seed=seed,
                                    unit=result["membership"]["unit"]))
    if save:
        save_audit(run, result)
    return result


def inversion_images(data: str | Path | DataBundle | ImageDataset) -> ImageDataset:
    """The images a node holds for the attack: the test split, all of a file without
    splits, or the training images of data that has splits but no test split."""
    from privmed.data.evalset import load_eval_split

    if isinstance(data, ImageDataset):
        return data
    if isinstance(data, DataBundle):
        return data.test if data.test is not None else data.train
    try:
        return load_eval_split(data)[0]
    except ConfigError:  # splits but no test split: its training images
        return load_data(data).train


def audit_inversion(data: str | Path | DataBundle | ImageDataset, *,
                    run: str | Path | None = None, out: str | Path | None = None,
                    batch_sizes: Sequence[int] = (1, 2, 4, 8),
                    scenarios: Sequence[str] = ("plain", "dp", "secure"),
                    model: str | None = None, noise_multiplier: float = 1.0,
                    max_grad_norm: float = 1.0, nodes: int = 3, steps: int = 1000,
                    seed: int = 0, progress: Progress | None = None) -> dict[str, Any]:
    """Rebuild a node's images from its federated update (Inverting Gradients, Geiping et
    al. 2020) and score the reconstructions (PSNR, SSIM, recovered labels).

    ``scenarios``: ``plain`` (the update as FedAvg would see it), ``dp`` (clipped to
    ``max_grad_norm`` and noised with ``noise_multiplier``) and ``secure`` (the sum of
    ``nodes`` nodes' updates: all the coordinator sees under secure aggregation). ``model``:
    the registered network the nodes train (default: a small CNN). ``run``: add the result
    and the image grid to that run's results.json and report; else ``out``: write
    ``inversion.json`` and ``inversion.png`` there (images of patients: mode 0600).
    Returns ``{"inversion": {"rows": [...], "settings": {...}}}``, a row per scenario and
    batch size with ``psnr_mean``, ``ssim_mean``, ``label_accuracy``. ::

        result = privmed.audit_inversion("synthetic", batch_sizes=[1], steps=300)
    """
    from privmed.audit.inversion import audit_inversion as attack
    from privmed.report.html import INVERSION_GRID
    from privmed.report.results import atomic_write_text

    if run is not None and not (Path(run) / "results.json").is_file():
        raise ConfigError(f"{run} has no results.json; pass a training run folder to --run.")
    result, grid = attack(model, inversion_images(data), batch_sizes=batch_sizes,
                          scenarios=scenarios, nodes=nodes, noise_multiplier=noise_multiplier,
                          max_grad_norm=max_grad_norm, steps=steps, seed=seed,
                          progress=progress)
    if run is not None:
        write_private_bytes(Path(run) / INVERSION_GRID, grid)  # 0600: patient images
        save_audit(run, result)
    elif out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "inversion.json", json.dumps(result, indent=2) + "\n")
        write_private_bytes(folder / "inversion.png", grid)  # 0600: patient images
    return result
