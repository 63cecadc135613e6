"""A node's replay store: every reply it released, kept beside its ledger.

When the coordinator asks for the same round again (it crashed and resumed), the stored
reply is sent again: re-sending an output already released costs no privacy, so the ledger
is not charged twice. A stored reply is bound to the job's settings and to whether it was
made for secure aggregation (then it is never sent in the clear), and a masked vector to
the one set of survivors it may be unmasked with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from privmed.errors import ConfigError
from privmed.federation.config import FederationConfig
from privmed.federation.messages import NodeReply
from privmed.fileio import save_private_torch


class StoredReplyError(ConfigError):
    """A stored reply may not be sent for this request."""


# Settings a resumed job may change without changing what a round computes.
_OPERATIONAL = ("round_timeout", "min_nodes", "round_retries")


def job_fingerprint(job: FederationConfig) -> str:
    """What a stored reply answered: the job's settings, bar the operational ones."""
    record = {k: v for k, v in job.to_record().items() if k not in _OPERATIONAL}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


def _read_stored(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=False)


def _write_stored(path: Path, saved: dict[str, Any]) -> None:
    save_private_torch(saved, path)  # 0600: a released model or a noise share


def load_stored_reply(path: Path | None, job: FederationConfig, *, secure: bool
                      ) -> NodeReply | None:
    """A reply this node already released for ``job``, marked as replayed; None if there
    is none. Refused (StoredReplyError) for another job under the same id, and in the
    clear when it was made for secure aggregation (a distributed-DP share carries only
    part of the noise; any masked vector was meant to be seen only in a sum)."""
    if path is None or not path.exists():
        return None
    saved = _read_stored(path)
    binding = saved.get("binding") or {"secure": True}
    if binding.get("job") not in (None, job_fingerprint(job)):
        raise StoredReplyError(f"This node answered {path.stem} of job {job.job_id} for other "
                               "settings; run the new settings under a new job id.")
    if binding.get("secure") and not secure:
        raise StoredReplyError(f"This node answered {path.stem} of job {job.job_id} under "
                               "secure aggregation and will not send it in the clear; run "
                               "the job under a new id.")
    reply = NodeReply.from_meta(json.loads(saved["meta"]), saved["arrays"])
    reply.replayed = True
    return reply


def store_reply(path: Path | None, reply: NodeReply, job: FederationConfig, *,
                secure: bool) -> None:
    """Keep a released reply (atomically) so that a repeated request re-sends it, bound to
    the job's settings and to whether it was made for secure aggregation."""
    if path is None:
        return
    _write_stored(path, {"meta": json.dumps(reply.meta()), "arrays": reply.arrays,
                         "binding": {"job": job_fingerprint(job), "secure": secure,
                                     "revealed_with": None}})


def bind_survivors(path: Path, survivors: list[int]) -> None:
    """Record the one set of survivors a stored vector may be unmasked with, or refuse
    another: two sums over different survivor sets that share replayed vectors give
    the coordinator their difference, one node's vector."""
    saved = _read_stored(path)
    binding = saved.setdefault("binding", {"secure": True})
    bound = binding.get("revealed_with")
    if bound is None:
        binding["revealed_with"] = sorted(int(n) for n in survivors)
        _write_stored(path, saved)
    elif bound != sorted(int(n) for n in survivors):
        raise StoredReplyError(f"This node already revealed its {path.stem} vector in a sum "
                               "with other survivors; revealing it with another set would "
                               "give away one node's vector as the difference.")
