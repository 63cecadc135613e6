"""Gradient-inversion audit: what one node's federated update gives away about its images.

The attack is Inverting Gradients (Geiping et al. 2020, arXiv:2003.14053): signed Adam on
dummy images boxed to [0, 1], minimising one minus the cosine similarity of their gradient
and the observed update (all layers) plus a total-variation prior, with labels read from the
update first (iDLG for one image; counts from the bias gradient for a batch). It is run
against three things a curious coordinator could hold at round 1 of FedSGD:

* ``plain``: one node's mean-loss gradient on its batch (federated SGD without DP);
* ``dp``: the same batch's per-sample clipped gradient sum plus ``N(0, (sigma C)^2)``, over
  the batch size: a node's update under DP-SGD with the whole noise added locally;
* ``secure``: what the coordinator unmasks under secure aggregation with distributed DP
  (``privmed.federation.node.updates``): the sum of every node's clipped sum plus its noise
  share ``N(0, (sigma C)^2 / t)``, ``t`` the number of nodes, over the summed batch sizes.

Reconstructions are matched to the true images by an optimal assignment on PSNR and scored
with PSNR and SSIM (scikit-image).
"""

from __future__ import annotations

import io
import math
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from privmed.data.dataset import ImageDataset
from privmed.errors import ConfigError
from privmed.federation.messages import VECTOR_SCALE
from privmed.models import create_model, model_kwargs
from privmed.privacy.clipping import clipped_gradient_sum

Progress = Callable[[int, int], None]
Batch = tuple[torch.Tensor, torch.Tensor]

SCENARIOS = ("plain", "dp", "secure")
AUDIT_MODEL = "small-cnn"
AUDIT_MODEL_KWARGS: dict[str, Any] = {"width": 16}
PSNR_CAP = 100.0  # dB; identical images have infinite PSNR, strict JSON has no inf
DEFAULT_STEPS = 1000


def audit_model(in_channels: int, num_classes: int, seed: int = 0, *, name: str | None = None,
                image_shape: tuple[int, int, int] | None = None) -> nn.Module:
    """A network freshly initialised from ``seed``, as at round 1 of a federated job: by
    default ``small-cnn`` of width 16 (14.5k parameters, inverted in seconds per batch),
    else the registered model ``name`` (``image_shape`` for those that need the size)."""
    kwargs = AUDIT_MODEL_KWARGS if name is None else \
        model_kwargs(name, image_shape or (in_channels, 28, 28))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(name or AUDIT_MODEL, in_channels, num_classes, **kwargs)
    return model.eval()


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters a node trains (and so sends gradients of), in registration order."""
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def _check_batch(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0] \
            or images.shape[0] == 0:
        raise ConfigError(f"A batch needs images B x C x H x W and B labels, got "
                          f"{tuple(images.shape)} and {tuple(labels.shape)}.")


def _mean_gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                   create_graph: bool = False) -> list[torch.Tensor]:
    loss = nn.functional.cross_entropy(model(images), labels)
    return list(torch.autograd.grad(loss, list(_params(model).values()),
                                    create_graph=create_graph))


def _unflatten(model: nn.Module, flat: torch.Tensor) -> list[torch.Tensor]:
    out, offset = [], 0
    for p in _params(model).values():
        out.append(flat[offset:offset + p.numel()].reshape(p.shape).float())
        offset += p.numel()
    return out


def _secure_sum(vectors: list[np.ndarray]) -> np.ndarray:
    """The sum the coordinator unmasks when every node sends its vector through the real
    secure-aggregation protocol (keys, Shamir shares, masks, the federation's ring)."""
    from privmed.federation.messages import ENCODING
    from privmed.federation.secagg.protocol import Params, SecAggNode, SecAggServer

    length = vectors[0].shape[0]
    params = Params(run_id=secrets.token_bytes(16), threshold=len(vectors), encoding=ENCODING,
                    instances=1)
    nodes = {i + 1: SecAggNode(i + 1, params) for i in range(len(vectors))}
    server = SecAggServer(params)
    roster = server.make_roster({i: node.advertise() for i, node in nodes.items()})
    dealt = {i: node.share_keys(roster) for i, node in nodes.items()}
    inbox = server.route({i: blobs for i, (blobs, _) in dealt.items()})
    server.accept_key_shares(dealt, {i: node.receive_key_shares(inbox[i])
                                     for i, node in nodes.items()})
    instance, active = server.begin(), server.active()
    inputs = {i: nodes[i].masked_input(instance, active, vectors[i - 1]) for i in active}
    survivors, dropped, _ = server.collect(active, inputs, length)
    routed = server.route({i: inputs[i]["b_shares"] for i in survivors})
    replies = {j: nodes[j].unmask(instance, survivors, dropped, routed[j]) for j in survivors}
    return server.unmask(instance, inputs, survivors, dropped, replies, length)


def node_update(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, scenario: str,
                *, max_grad_norm: float = 1.0, noise_multiplier: float = 1.0,
                other_nodes: list[Batch] | None = None,
                generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """The gradient-shaped update (one tensor per trained parameter) that the attacker sees
    for this node's batch under ``scenario`` (see the module docstring). ``other_nodes``:
    the other nodes' batches in a ``secure`` round. ``generator`` seeds the noise."""
    if scenario not in SCENARIOS:
        raise ConfigError(f"Unknown scenario '{scenario}'; use one of {list(SCENARIOS)}.")
    _check_batch(images, labels)
    if max_grad_norm <= 0 or noise_multiplier < 0:
        raise ConfigError(f"Clipping needs max_grad_norm > 0 and noise_multiplier >= 0, got "
                          f"{max_grad_norm} and {noise_multiplier}.")
    model.eval()
    if scenario == "plain":
        return [g.detach() for g in _mean_gradient(model, images, labels)]
    batches = [(images, labels)] if scenario == "dp" else [(images, labels), *(other_nodes or [])]
    if scenario == "secure" and len(batches) < 2:
        raise ConfigError("The 'secure' scenario needs the other nodes' batches (other_nodes); "
                          "secure aggregation sums at least two nodes.")
    # Each node adds its share sigma*C/sqrt(t) (t=1 for 'dp': the whole noise locally).
    std = noise_multiplier * max_grad_norm / math.sqrt(len(batches))
    shares = []
    for x, y in batches:
        _check_batch(x, y)
        weights = {k: p.detach() for k, p in _params(model).items()}
        total = clipped_gradient_sum(model, weights, x, y, max_grad_norm)
        noise = torch.normal(0.0, std, total.shape, generator=generator, dtype=torch.float64)
        shares.append((total + noise, x.shape[0]))
    if scenario == "dp":
        vector, count = shares[0]
        return _unflatten(model, vector / count)
    # As noisy_gradient sends it: [noisy sum, batch size] / VECTOR_SCALE (a fixed batch here
    # where the federation sends the Poisson batch's expected size); the coordinator divides
    # the unmasked sum by the summed batch sizes (ServerOptimizer.step).
    vectors = [np.append(v.numpy(), float(n)) / VECTOR_SCALE for v, n in shares]
    unmasked = _secure_sum(vectors) * VECTOR_SCALE
    return _unflatten(model, torch.from_numpy(unmasked[:-1] / unmasked[-1]))


def recover_labels(update: Sequence[torch.Tensor], num_classes: int, batch_size: int, *,
                   probs: torch.Tensor | None = None) -> torch.Tensor:
    """Labels of the batch, read from the last layer's gradient (sorted, ``batch_size``).

    The bias gradient of cross-entropy is ``mean_i(p_i - onehot(y_i))``: for one image its
    only negative entry is the label (iDLG). For a batch, class ``c`` holds about
    ``B * (probs_c - g_c)`` images, ``probs`` the model's mean softmax (default uniform, as
    at initialisation): counts are rounded by largest remainders, a class with a negative
    entry getting at least one (Yin et al. 2021; the count estimate of Wainakh et al. 2022).
    Without a bias, the row sums of the weight gradient stand in."""
    if batch_size < 1 or num_classes < 2:
        raise ConfigError(f"Label recovery needs batch_size >= 1 and num_classes >= 2, got "
                          f"{batch_size} and {num_classes}.")
    last = update[-1] if len(update) else torch.zeros(0)
    if tuple(last.shape) == (num_classes,):  # the head's bias (registered after its weight)
        g = last.detach().double()
    elif last.ndim == 2 and last.shape[0] == num_classes:
        g = last.detach().double().sum(dim=1)
    else:
        raise ConfigError(f"The update does not end with a layer of {num_classes} outputs.")
    if batch_size == 1:
        return g.argmin().reshape(1)
    prior = (torch.full((num_classes,), 1 / num_classes, dtype=torch.float64) if probs is None
             else probs.detach().double().reshape(num_classes))
    estimate = (batch_size * (prior - g)).clamp(min=0)
    counts = estimate.floor().long()
    counts[(g < 0) & (counts == 0)] = 1
    while counts.sum() > batch_size:  # too many: take from the classes least sure of theirs
        counts[torch.where(counts > 0, estimate - counts, torch.inf).argmin()] -= 1
    while counts.sum() < batch_size:  # largest remainders first
        counts[(estimate - counts).argmax()] += 1
    return torch.repeat_interleave(torch.arange(num_classes), counts)


def label_accuracy(recovered: torch.Tensor, true: torch.Tensor, num_classes: int) -> float:
    """Share of the batch's labels recovered, as multisets (the order is unknown)."""
    hits = torch.minimum(torch.bincount(recovered, minlength=num_classes),
                         torch.bincount(true, minlength=num_classes))
    return float(hits.sum()) / max(int(true.numel()), 1)


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    return ((x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean()
            + (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean())


def invert(model: nn.Module, update: Sequence[torch.Tensor], labels: torch.Tensor,
           shape: Sequence[int], *, steps: int = DEFAULT_STEPS, lr: float = 0.1,
           tv_weight: float = 1e-2, restarts: int = 1, signed: bool = True, seed: int = 0,
           progress: Progress | None = None) -> torch.Tensor:
    """Inverting Gradients: images of ``shape`` (B x C x H x W, pixels in [0, 1]) whose
    gradient under ``labels`` points where ``update`` does. Adam (``lr``, decayed tenfold
    at 3/8, 5/8 and 7/8 of ``steps``) on signed gradients, boxed to [0, 1] after every step;
    of ``restarts`` random starts the one with the lowest final loss is kept (the attacker
    has no ground truth). ``progress(done, total)`` counts steps over all restarts."""
    shape = tuple(int(s) for s in shape)
    params = _params(model)
    if len(shape) != 4 or shape[0] != labels.numel():
        raise ConfigError(f"The image shape must be B x C x H x W with B = {labels.numel()} "
                          f"labels, got {shape}.")
    if len(update) != len(params) or any(tuple(g.shape) != tuple(p.shape)
                                         for g, p in zip(update, params.values(), strict=False)):
        raise ConfigError("The update does not match the model's trained parameters.")
    if steps < 1 or restarts < 1 or lr <= 0 or tv_weight < 0:
        raise ConfigError(f"Inversion needs steps >= 1, restarts >= 1, lr > 0 and "
                          f"tv_weight >= 0, got {steps}, {restarts}, {lr} and {tv_weight}.")
    model.eval()
    target = [g.detach().float() for g in update]
    target_norm = torch.sqrt(sum((t * t).sum() for t in target)).clamp(min=1e-12)

    def objective(x: torch.Tensor) -> torch.Tensor:
        grads = _mean_gradient(model, x, labels, create_graph=True)
        dot = sum((g * t).sum() for g, t in zip(grads, target, strict=True))
        norm = torch.sqrt(sum((g * g).sum() for g in grads)).clamp(min=1e-12)
        return 1 - dot / (norm * target_norm) + tv_weight * _total_variation(x)

    best, best_loss = None, math.inf
    milestones = [int(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    # A tiny network's double backward is all per-op overhead: intra-op threads only add
    # synchronisation (measured 5.7 vs 210 ms a step on a loaded 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for r in range(restarts):
            gen = torch.Generator().manual_seed(seed * 1000 + r)
            x = torch.rand(shape, generator=gen).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            schedule = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
            for step in range(steps):
                opt.zero_grad()
                loss = objective(x)
                (x.grad,) = torch.autograd.grad(loss, [x])
                if signed:
                    x.grad.sign_()
                opt.step()
                schedule.step()
                with torch.no_grad():
                    x.clamp_(0, 1)
                if progress is not None:
                    progress(r * steps + step + 1, restarts * steps)
            final = float(objective(x).detach())
            if best is None or final < best_loss:
                best, best_loss = x.detach().clone(), final
    finally:
        torch.set_num_threads(threads)
    assert best is not None
    return best


def _psnr(truth: np.ndarray, recon: np.ndarray) -> float:
    mse = float(np.mean((truth.astype(np.float64) - recon) ** 2))
    if mse == 0:
        return PSNR_CAP
    return min(float(peak_signal_noise_ratio(truth, recon, data_range=1.0)), PSNR_CAP)


def _ssim(truth: np.ndarray, recon: np.ndarray) -> float:
    """SSIM of two C x H x W images (7 x 7 window, or the largest odd one that fits)."""
    win = min(7, *truth.shape[1:])
    win -= 1 - win % 2
    if truth.shape[0] == 1:
        return float(structural_similarity(truth[0], recon[0], data_range=1.0, win_size=win))
    return float(structural_similarity(truth, recon, data_range=1.0, channel_axis=0,
                                       win_size=win))


def match_and_score(recon: torch.Tensor, truth: torch.Tensor) -> list[dict]:
    """One entry per true image (in order): the reconstruction an optimal assignment on PSNR
    gives it (``match``), with PSNR (dB, capped at 100) and SSIM, both with data range 1."""
    r = recon.detach().double().clamp(0, 1).numpy()
    t = truth.detach().double().clamp(0, 1).numpy()
    if r.ndim != 4 or r.shape[1:] != t.shape[1:] or r.shape[0] < t.shape[0]:
        raise ConfigError(f"Cannot match {tuple(recon.shape)} reconstructions to "
                          f"{tuple(truth.shape)} true images.")
    psnr = np.array([[_psnr(ti, ri) for ri in r] for ti in t])
    rows, cols = linear_sum_assignment(-psnr)
    return [{"index": int(i), "match": int(j), "psnr": float(psnr[i, j]),
             "ssim": _ssim(t[i], r[j])} for i, j in zip(rows, cols, strict=True)]


def _grid_png(panels: list[tuple[str, np.ndarray, np.ndarray]]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = max(p[1].shape[0] for p in panels)
    fig = Figure(figsize=(1.1 * cols + 1.6, 2.2 * len(panels)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    grids = fig.subfigures(len(panels), 1, squeeze=False)[:, 0]
    for sub, (title, truth, recon) in zip(grids, panels, strict=True):
        sub.suptitle(title, fontsize=9)
        axes = sub.subplots(2, cols, squeeze=False)
        for row, images in enumerate((truth, recon)):
            axes[row, 0].set_ylabel("true" if row == 0 else "recon.", fontsize=8)
            for k, ax in enumerate(axes[row]):
                ax.set_xticks([])
                ax.set_yticks([])
                if k < images.shape[0]:
                    img = images[k]
                    ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0),
                              cmap="gray", vmin=0, vmax=1)
                else:
                    ax.set_axis_off()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _attack(model: nn.Module, batches: list[Batch], scenario: str, num_classes: int, *,
            noise_multiplier: float, max_grad_norm: float, steps: int, lr: float,
            tv_weight: float, restarts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(recovered labels, reconstructions) of the first batch's images under ``scenario``."""
    (images, labels), b = batches[0], batches[0][0].shape[0]
    # Seeded noise: the audit is reproducible (the federation's nodes use secret seeds).
    update = node_update(model, images, labels, scenario, max_grad_norm=max_grad_norm,
                         noise_multiplier=noise_multiplier, other_nodes=batches[1:],
                         generator=torch.Generator().manual_seed(seed))
    guessed = recover_labels(update, num_classes, b)
    if b > 1:  # re-estimate the count prior from the model on a rough reconstruction
        rough = invert(model, update, guessed, images.shape, steps=max(steps // 10, 1), lr=lr,
                       tv_weight=tv_weight, seed=seed)
        with torch.no_grad():
            probs = model(rough).softmax(dim=1).mean(dim=0)
        guessed = recover_labels(update, num_classes, b, probs=probs)
    return guessed, invert(model, update, guessed, images.shape, steps=steps, lr=lr,
                           tv_weight=tv_weight, restarts=restarts, seed=seed)


def audit_inversion(model: nn.Module | str | None, dataset: ImageDataset, *,
                    batch_sizes: Sequence[int] = (1, 2, 4, 8),
                    scenarios: Sequence[str] = SCENARIOS, nodes: int = 3,
                    noise_multiplier: float = 1.0, max_grad_norm: float = 1.0,
                    steps: int = DEFAULT_STEPS, lr: float = 0.1, tv_weight: float = 1e-2,
                    restarts: int = 1, seed: int = 0, progress: Progress | None = None
                    ) -> tuple[dict, bytes]:
    """Run the attack for every scenario and batch size on images of ``dataset``.

    ``model``: the network the nodes train (None: :func:`audit_model`; a name: a registered
    model, freshly initialised from ``seed``). The target node's batch is the same in every
    scenario; in ``secure`` rounds ``nodes - 1`` other nodes hold disjoint batches of the
    same size. Returns the strict-JSON result ``{"inversion": {"rows", "settings"}}`` (each
    row also scores the data set's mean image as a guess made without any update:
    ``mean_image_psnr`` / ``_ssim``) and a PNG grid (per scenario and batch: true images
    above their matched reconstructions). ``progress(done, total)`` counts attacks."""
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown or not scenarios:
        raise ConfigError(f"Unknown scenario {unknown[0] if unknown else '(none given)'!r}; "
                          f"use some of {list(SCENARIOS)}.")
    sizes = [int(b) for b in batch_sizes]
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"Batch sizes must be positive integers, got {list(batch_sizes)}.")
    secure = "secure" in scenarios
    if secure and nodes < 2:
        raise ConfigError(f"Secure aggregation needs at least 2 nodes, got {nodes}.")
    per_node = f" on each of {nodes} nodes" if secure else ""
    if max(sizes) * (nodes if secure else 1) > len(dataset):
        raise ConfigError(f"The audit needs {max(sizes) * (nodes if secure else 1)} images "
                          f"(batch size {max(sizes)}{per_node}) but the data set has only "
                          f"{len(dataset)}.")
    c, k = dataset.image_shape[0], dataset.num_classes
    name = f"{AUDIT_MODEL} {AUDIT_MODEL_KWARGS}" if model is None else \
        model if isinstance(model, str) else type(model).__name__
    if not isinstance(model, nn.Module):
        model = audit_model(c, k, seed, name=model, image_shape=dataset.image_shape)
    model.eval()
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(dataset)))
    mean_image = dataset.images.mean(dim=0, keepdim=True)
    rows: list[dict] = []
    panels = []
    for n, (scenario, b) in enumerate((s, b) for s in scenarios for b in sizes):
        if progress is not None:
            progress(n, len(scenarios) * len(sizes))
        start = time.perf_counter()
        idx = perm[:b * nodes].reshape(nodes, b) if scenario == "secure" else perm[:b][None]
        batches = [(dataset.images[i], dataset.labels[i]) for i in idx]
        images, labels = batches[0]
        guessed, recon = _attack(model, batches, scenario, k, noise_multiplier=noise_multiplier,
                                 max_grad_norm=max_grad_norm, steps=steps, lr=lr,
                                 tv_weight=tv_weight, restarts=restarts, seed=seed)
        scores = match_and_score(recon, images)
        guess = match_and_score(mean_image.expand_as(images), images)
        psnr, ssim = [s["psnr"] for s in scores], [s["ssim"] for s in scores]
        rows.append({"scenario": scenario, "batch_size": b,
                     "psnr_mean": float(np.mean(psnr)), "ssim_mean": float(np.mean(ssim)),
                     "label_accuracy": label_accuracy(guessed, labels, k), "steps": steps,
                     "psnr": psnr, "ssim": ssim,
                     "mean_image_psnr": float(np.mean([s["psnr"] for s in guess])),
                     "mean_image_ssim": float(np.mean([s["ssim"] for s in guess])),
                     "seconds": round(time.perf_counter() - start, 2)})
        panels.append((f"{scenario}, batch {b}: PSNR {np.mean(psnr):.1f} dB, SSIM "
                       f"{np.mean(ssim):.2f}", images.numpy(),
                       recon[[s["match"] for s in scores]].numpy()))
    if progress is not None:
        progress(len(rows), len(rows))
    settings = {
        "attack": "Inverting Gradients (Geiping et al. 2020), labels by iDLG / counts",
        "model": name, "parameters": sum(p.numel() for p in _params(model).values()),
        "dataset": dataset.name, "images": len(dataset), "seed": seed, "nodes": nodes,
        "noise_multiplier": noise_multiplier, "max_grad_norm": max_grad_norm, "steps": steps,
        "lr": lr, "tv_weight": tv_weight, "restarts": restarts, "psnr_cap_db": PSNR_CAP,
        "secure_aggregation": "real secagg protocol; noise share sigma*C/sqrt(nodes)"}
    return {"inversion": {"rows": rows, "settings": settings}}, _grid_png(panels)
