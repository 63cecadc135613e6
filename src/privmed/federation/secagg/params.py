"""What both sides of the protocol share: its parameters, its errors and the checks of
what a roster and a commitment list must look like (``protocol`` is the front door)."""

from __future__ import annotations

from dataclasses import dataclass, field

from privmed.errors import PrivmedError
from privmed.federation.secagg import sealing
from privmed.federation.secagg.encoding import FixedPoint
from privmed.federation.secagg.sealing import ProtocolError

__all__ = ["MAX_INSTANCES", "Params", "ProtocolError", "RecoveryError", "check_threshold",
           "valid_advert", "valid_commits"]

MAX_INSTANCES = 256  # one-time keys per key setup: bounds the setup messages


class RecoveryError(PrivmedError):
    """Too few nodes answered, or their secrets did not check out: the sum is not
    released."""

    exit_code = 5


@dataclass(frozen=True)
class Params:
    run_id: bytes
    threshold: int
    encoding: FixedPoint = field(default_factory=FixedPoint)
    instances: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.instances <= MAX_INSTANCES:
            raise ProtocolError(f"A key setup holds 1 to {MAX_INSTANCES} one-time keys, not "
                                f"{self.instances}.")


def check_threshold(threshold: int, roster_size: int) -> None:
    """A threshold must be a strict majority of the roster (and at least 2): below that,
    two disjoint groups of honest survivors could each unmask a sum, and the nodes that
    revealed one sum could not stop a second over another set of survivors."""
    if not (threshold >= 2 and roster_size // 2 < threshold <= roster_size):
        raise ProtocolError(f"Threshold {threshold} is not a majority of a roster of "
                            f"{roster_size} nodes (at least {max(2, roster_size // 2 + 1)} "
                            "is needed): refusing it.")


def valid_advert(advert: object, instances: int) -> bool:
    if not isinstance(advert, dict) or set(advert) != {"c_pk", "s_pks"}:
        return False
    keys = advert["s_pks"]
    # every key checked by an agreement: a low-order point would break every peer's setup
    return (isinstance(keys, list) and len(keys) == instances and len(set(keys)) == instances
            and all(sealing.valid_public_key(k) for k in [advert["c_pk"], *keys]))


def valid_commits(commits: object, count: int) -> bool:
    return (isinstance(commits, list) and len(commits) == count
            and all(isinstance(c, bytes) and len(c) == 32 for c in commits))
