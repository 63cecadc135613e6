"""A hospital's node: its data, its ledger, its privacy plan and its secure-aggregation keys.

Transport-free: the handler (``node.handler``) decodes a request and calls the round's
computation (``node.updates``), which asks the :class:`SiteNode` for everything the
site owns. The node, never the coordinator, decides clipping and noise: it plans (with
the one planner central training uses) so that the job's rounds reach the job's epsilon
on *its* data, and it records in its own ledger what leaves it: a release is *reserved*
when computed (refused if it would overspend) and *committed* when sent; a vector computed
but never sent is given back at the node's next round. Every released reply is kept in
the replay store beside the ledger (``node.replies``), so a repeated request is answered
with it and never charged twice.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from privmed.data import DataBundle, load_data
from privmed.errors import ConfigError
from privmed.federation.config import FederationConfig
from privmed.federation.messages import STATS_ROUND, NodeReply, pack, unpack
from privmed.federation.node import replies
from privmed.federation.secagg.protocol import SecAggNode
from privmed.privacy import BudgetLedger, default_delta, history_from_json
from privmed.privacy.ledger_home import LEDGER_NAME
from privmed.privacy.records import protected_units
from privmed.training.fit import DPPlan, plan_privacy
from privmed.training.run import open_ledger

if TYPE_CHECKING:
    from privmed.privacy import PrivacyConfig
    from privmed.privacy.records import PrivacyRecords
    from privmed.training import TrainConfig

History = list[tuple[float, float, int]]
_NO_LEDGER = ("This node has no ledger; it only takes DP jobs with a ledger (start it with "
              "--ledger FILE --budget-epsilon E).")


def stats_run_id(job_id: str) -> str:
    return f"{job_id}-stats"


def round_run_id(job_id: str, round_no: int) -> str:
    return stats_run_id(job_id) if round_no == STATS_ROUND else f"{job_id}-round-{round_no}"


def _round_of(run_id: str, job_id: str) -> int | None:
    """The round of one of ``job_id``'s ledger entries (0: the statistics), matched
    exactly: job ``a`` must never take job ``a-b``'s entries for its own."""
    if run_id == stats_run_id(job_id):
        return STATS_ROUND
    match = re.fullmatch(re.escape(job_id) + r"-round-(\d+)", run_id)
    return int(match.group(1)) if match else None


class SiteNode:
    """One site's data, ledger, budget and secure-aggregation sessions.

    ``max_sites``: how many sites this hospital knows the federation has; under secure
    aggregation it refuses a roster of more nodes (a coordinator padding the roster with
    nodes of its own would need fewer real survivors to unmask)."""

    def __init__(self, data: str | Path | DataBundle, *, ledger: str | Path | None = None,
                 budget_epsilon: float | None = None, name: str | None = None,
                 size: int | None = None, max_sites: int | None = None) -> None:
        if max_sites is not None and (isinstance(max_sites, bool) or max_sites < 2):
            raise ConfigError(f"A federation has at least 2 sites, not {max_sites!r}.")
        self.max_sites = max_sites
        self.bundle = data if isinstance(data, DataBundle) else load_data(data, size=size)
        self.name = name or self.bundle.source
        if budget_epsilon is not None and ledger is None:
            raise ConfigError("A node's budget needs --ledger FILE to record it in.")
        self.ledger_path = Path(ledger) if ledger is not None else None
        self.budget_epsilon = budget_epsilon
        #: Secure-aggregation sessions by job id: this node's one-time mask keys.
        self.sessions: dict[str, SecAggNode] = {}
        if self.ledger_path is not None:
            self.open_ledger()  # fail at start-up, not in the first round

    @property
    def num_examples(self) -> int:
        return len(self.bundle.train)

    @property
    def dataset_id(self) -> str:
        return self.bundle.train.dataset_id

    @property
    def privacy_unit(self) -> str:
        """What this node's DP protects: 'patient' whenever its data names the patients."""
        return protected_units("auto", self.bundle.train)[0]

    @property
    def num_units(self) -> int:
        """Patients (or images, when the patients are unknown) in the training split."""
        return protected_units("auto", self.bundle.train)[1]

    def refusal(self, reason: str) -> NodeReply:
        return NodeReply("refused", self.name, reason, self.num_examples)

    def failure(self, reason: str) -> NodeReply:
        return NodeReply("error", self.name, reason, self.num_examples)

    # ---------------------------------------------------------------- privacy plan

    def privacy_records(self) -> PrivacyRecords:
        """The records this node's DP releases touch, for its ledger."""
        return self.bundle.train.privacy_records(self.privacy_unit)

    def privacy_config(self, job: FederationConfig, noise_multiplier: float | None = None
                       ) -> PrivacyConfig:
        """The job's DP-SGD settings, protecting this node's unit."""
        return job.privacy_config(self.privacy_unit, noise_multiplier)

    def delta(self, job: FederationConfig) -> float:
        """The job's delta, or the default for this node's size; must be below 1/N (N its
        patients, or images when the patients are unknown)."""
        return self.privacy_config(job).resolved_delta(self.num_units, self.privacy_unit)

    def plan(self, job: FederationConfig) -> DPPlan:
        """How this node releases under ``job``, all its rounds after the normalisation
        statistics reaching the job's ε on its data: ``--dp distributed`` one step of rate
        B / N per round, ``--dp local`` ``local_epochs`` epochs of DP-SGD per round."""
        config = self.train_config(job, 0)
        if job.distributed:  # per patient when the node knows them: expected B images
            q = min(job.batch_size, self.num_examples) / self.num_examples
            return plan_privacy(self.privacy_config(job), self.bundle.train, config,
                                sample_rate=q, steps=job.rounds, prefix=job.stats_history())
        return plan_privacy(self.privacy_config(job), self.bundle.train, config,
                            steps=self.steps_per_round(job) * job.rounds,
                            prefix=job.stats_history())

    def steps_per_round(self, job: FederationConfig) -> int:
        if job.distributed:
            return 1
        return -(-self.num_examples // job.batch_size) * job.local_epochs

    def planned_history(self, job: FederationConfig) -> History:
        """Everything ``job`` will charge this node's ledger if it takes part in every
        round: the normalisation statistics, then ``job.rounds`` rounds of its own (σ, q)."""
        return self.plan(job).history

    def train_config(self, job: FederationConfig, round_no: int) -> TrainConfig:
        """One local round of ``--dp local``: the job's epochs at a constant rate."""
        return job.train_config(round_no)

    # ---------------------------------------------------------------- ledger

    def open_ledger(self, delta: float | None = None) -> BudgetLedger:
        if self.ledger_path is None:
            raise ConfigError(_NO_LEDGER)
        return open_ledger(self.ledger_path, self.dataset_id, self.budget_epsilon,
                           delta if delta is not None else default_delta(self.num_units))

    def check_release_mode(self, job: FederationConfig) -> None:
        """A DP job needs a ledger; a node that keeps a budget releases nothing without DP."""
        if job.private and self.ledger_path is None:
            raise ConfigError(_NO_LEDGER)
        if not job.private and self.budget_epsilon is not None:
            raise ConfigError("This node keeps a privacy budget and does not release "
                              "non-private updates (the job has --dp none).")

    def _job_entries(self, job: FederationConfig) -> dict[str, dict]:
        ledger = self.open_ledger(self.delta(job))
        return {e["run_id"]: e for e in ledger.entries(self.dataset_id)
                if _round_of(e["run_id"], job.job_id) is not None}

    def released_rounds(self, job: FederationConfig) -> int:
        """Training rounds of ``job`` this node has sent (charged) so far."""
        return sum(1 for run, e in self._job_entries(job).items()
                   if e["status"] == "committed" and _round_of(run, job.job_id) != STATS_ROUND)

    def reserve(self, job: FederationConfig, round_no: int, history: History) -> None:
        """Reserve a release computed now; BudgetExceededError if it would overspend."""
        delta = self.delta(job)
        self.open_ledger(delta).reserve(self.dataset_id, round_run_id(job.job_id, round_no),
                                        history, delta, records=self.privacy_records())

    def charge_release(self, job_id: str, round_no: int) -> None:
        """Charge ``round_no``'s release: the node is about to send it (in the clear, or
        masked: from then on ``t`` peers holding its self-mask shares can complete the sum
        without it, so the release is out of its hands). A reservation given back earlier
        is charged again (or refused, BudgetExceededError, and then nothing is sent)."""
        if self.ledger_path is None:
            return
        ledger = self.open_ledger()
        run_id = round_run_id(job_id, round_no)
        entry = next((e for e in ledger.entries(self.dataset_id) if e["run_id"] == run_id),
                     None)
        if entry is None or entry["status"] == "committed":
            return
        planned = history_from_json(entry["planned_history"])
        if entry["status"] == "released":
            ledger.reserve(self.dataset_id, run_id, planned, records=self.privacy_records())
        ledger.commit(run_id, planned, self.dataset_id)

    def release_discarded(self, job: FederationConfig, before_round: int) -> None:
        """Give back the reservations of earlier rounds whose vector this node computed but
        never sent (a sent one is charged at once): no sum can hold it."""
        if self.ledger_path is None or not job.distributed:
            return
        ledger = self.open_ledger(self.delta(job))
        for run_id, entry in self._job_entries(job).items():
            round_no = _round_of(run_id, job.job_id)
            if entry["status"] == "reserved" and round_no and round_no < before_round:
                ledger.release(run_id, self.dataset_id)

    # ---------------------------------------------------------------- replay store

    def stored_path(self, job: FederationConfig, round_no: int) -> Path | None:
        """Where this node keeps its released reply of ``job``'s round (round 0: the
        statistics), beside its ledger; None without a ledger."""
        if self.ledger_path is None:
            return None
        name = "stats.pt" if round_no == STATS_ROUND else f"round-{round_no:04d}.pt"
        rounds = self.ledger_path.parent / f"{self.ledger_path.name}.rounds"
        if self.ledger_path.name == LEDGER_NAME and not (rounds / job.job_id).is_dir():
            rounds = rounds / self.dataset_id  # a ledger folder's sites share it
        return rounds / job.job_id / name

    def rounds_stored(self, job: FederationConfig) -> int:
        probe = self.stored_path(job, 1)
        return len(list(probe.parent.glob("round-*.pt"))) if probe and probe.parent.exists() else 0

    def replay(self, job: FederationConfig, round_no: int, *, secure: bool) -> NodeReply | None:
        """The reply this node already released for the round, or None."""
        return replies.load_stored_reply(self.stored_path(job, round_no), job, secure=secure)

    def keep(self, reply: NodeReply, job: FederationConfig, round_no: int, *,
             secure: bool) -> None:
        replies.store_reply(self.stored_path(job, round_no), reply, job, secure=secure)

    # ---------------------------------------------------------------- secure aggregation

    def dump_sessions(self) -> str:
        """The node's secure-aggregation sessions as text (holds its secret keys)."""
        return pack({job: s.to_state() for job, s in self.sessions.items()})

    def load_sessions(self, text: str) -> None:
        from privmed.federation.messages import ENCODING

        self.sessions = {job: SecAggNode.from_state(state, ENCODING)
                         for job, state in unpack(text).items()}
