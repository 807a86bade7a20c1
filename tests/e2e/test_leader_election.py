"""Two replicas, one active (DESIGN 3.7): the Lease protocol, then two real operator processes of which the
leader is SIGKILLed in the middle of a recovery."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import processes
from flysim import FlySimulator
from harness import (
    LEASE_GROUP,
    LEASE_PLURAL,
    LEASE_VERSION,
    OperatorProcess,
    eventually,
    lease_holder,
    operator_env,
)
from kiloclaw_operator.kube import KubeClient, KubeConnection, KubeError
from kiloclaw_operator.leadership import (
    Claim,
    ElectionLoop,
    LeaderElector,
    LeadershipLost,
    LeaseConfig,
    claim,
    lease_body,
    micro_time,
)
from kiloclaw_operator.models import GROUP, INSTANCE_PLURAL, VERSION
from kiloclaw_operator.observe.feed import FirstWindow
from kiloclaw_operator.observe.standby import HeadStart
from kiloclaw_operator.run import run_elected
from kubesim import KubeSim

NAMESPACE = "default"


def config(identity: str, **overrides: Any) -> LeaseConfig:
    values: dict[str, Any] = {
        "namespace": NAMESPACE,
        "name": "kiloclaw-operator",
        "identity": identity,
        "duration_seconds": 3,
        "renew_deadline_seconds": 0.5,
        "retry_period_seconds": 0.05,
    }
    values.update(overrides)
    return LeaseConfig(**values)


def lease(holder: str, duration: int = 3, version: str = "7") -> dict[str, Any]:
    return {
        "metadata": {"name": "kiloclaw-operator", "namespace": NAMESPACE, "resourceVersion": version},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration, "renewTime": micro_time()},
    }


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the decision --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "unchanged_for", "expected"),
    [
        (None, 0, Claim.CREATE),
        (lease(""), 0, Claim.TAKE),
        (lease("me"), 0, Claim.TAKE),
        (lease("other"), 2.9, Claim.WAIT),
        (lease("other"), 3.0, Claim.TAKE),
    ],
    ids=["no-lease", "released", "ours-already", "other-fresh", "other-expired"],
)
def test_a_candidate_claims_a_missing_free_own_or_expired_lease_and_waits_on_a_fresh_one(
    record: dict[str, Any] | None, unchanged_for: float, expected: Claim
) -> None:
    assert claim(record, "me", unchanged_for) is expected


def test_renewing_keeps_the_acquire_time_and_a_new_holder_counts_a_transition() -> None:
    previous = lease("a")
    previous["spec"].update(acquireTime="2026-01-01T00:00:00.000000Z", leaseTransitions=4)
    from datetime import UTC, datetime

    renewed = lease_body(config("a"), previous, holder="a", now=datetime.now(UTC))["spec"]
    assert renewed["acquireTime"] == "2026-01-01T00:00:00.000000Z"
    assert renewed["leaseTransitions"] == 4
    taken = lease_body(config("b"), previous, holder="b", now=datetime.now(UTC))
    assert taken["spec"]["leaseTransitions"] == 5
    assert taken["spec"]["holderIdentity"] == "b"
    assert taken["metadata"]["resourceVersion"] == "7", "the write is conditional on what was read"
    released = lease_body(config("a"), previous, holder="", now=datetime.now(UTC))["spec"]
    assert "holderIdentity" not in released


# --- the elector against an API server -------------------------------------------------------------------


@pytest.fixture
def kube() -> Iterator[KubeSim]:
    kube = KubeSim()
    kube.start_in_thread()
    try:
        yield kube
    finally:
        kube.stop_thread()


@pytest.fixture
async def client(kube: KubeSim) -> AsyncIterator[KubeClient]:
    client = KubeClient(KubeConnection(server=kube.url, token="test"))
    try:
        yield client
    finally:
        await client.aclose()


async def leader_and_standby(client: KubeClient) -> tuple[LeaderElector, LeaderElector, ManualClock]:
    """``a`` holds the Lease; ``b``, on a clock of the test's, stands by."""
    leader = LeaderElector(client, config("a"))
    assert await leader.try_acquire_or_renew()
    clock = ManualClock()
    return leader, LeaderElector(client, config("b"), clock=clock), clock


async def test_the_first_candidate_creates_the_lease_and_the_second_stays_standby(
    kube: KubeSim, client: KubeClient
) -> None:
    first, second = LeaderElector(client, config("a")), LeaderElector(client, config("b"))
    assert await first.try_acquire_or_renew()
    assert not await second.try_acquire_or_renew()
    assert await first.try_acquire_or_renew(), "the holder renews"
    assert (first.is_leader, second.is_leader) == (True, False)
    assert lease_holder(kube) == "a"


async def test_the_leader_renews_with_one_conditional_update_and_no_read(
    kube: KubeSim, client: KubeClient
) -> None:
    """One request per renewal, the verb the FlowSchema in deploy/flowcontrol lifts into `leader-election`
    (a read would queue behind the operator's own burst in `workload-low`)."""
    leader = LeaderElector(client, config("a"))
    assert await leader.try_acquire_or_renew()
    before = len(kube.request_log)
    for _ in range(3):
        assert await leader.try_acquire_or_renew()
    renewals = [r.verb for r in list(kube.request_log)[before:] if r.resource == "leases"]
    assert renewals == ["update"] * 3
    # Someone else wrote in between: the conditional update conflicts, the full round reads and stands down.
    stored = kube.get_object(LEASE_GROUP, LEASE_VERSION, LEASE_PLURAL, NAMESPACE, "kiloclaw-operator")
    assert stored is not None
    stored["spec"]["holderIdentity"] = "usurper"
    await client.replace_lease(NAMESPACE, "kiloclaw-operator", stored)
    assert not await leader.try_acquire_or_renew()
    assert not leader.is_leader and lease_holder(kube) == "usurper"


async def test_a_standby_takes_an_unrenewed_lease_only_after_its_duration_on_the_standbys_own_clock(
    kube: KubeSim, client: KubeClient
) -> None:
    leader, standby, clock = await leader_and_standby(client)
    assert not await standby.try_acquire_or_renew()
    clock.now += 2.9
    assert not await standby.try_acquire_or_renew(), "the record is not older than its duration yet"
    assert await leader.try_acquire_or_renew(), "a renewal restarts the standby's count"
    clock.now += 2.9
    assert not await standby.try_acquire_or_renew()
    clock.now += 3.0
    assert await standby.try_acquire_or_renew()
    stored = kube.get_object(LEASE_GROUP, LEASE_VERSION, LEASE_PLURAL, NAMESPACE, "kiloclaw-operator")
    assert stored is not None
    assert stored["spec"]["holderIdentity"] == "b"
    assert stored["spec"]["leaseTransitions"] == 1
    assert not await leader.try_acquire_or_renew(), "the old leader sees another holder and stands down"
    assert not leader.is_leader


async def test_a_standby_tries_again_when_the_record_it_waits_on_expires_not_a_retry_period_later(
    kube: KubeSim, client: KubeClient
) -> None:
    leader = LeaderElector(client, config("a", duration_seconds=3))
    assert await leader.try_acquire_or_renew()
    clock = ManualClock()
    standby = LeaderElector(client, config("b", retry_period_seconds=1.0), clock=clock)
    assert not await standby.try_acquire_or_renew()
    assert standby.next_attempt_in() == 1.0, "3 s to go: a whole retry period"
    clock.now += 2.7
    assert not await standby.try_acquire_or_renew()
    assert standby.next_attempt_in() == pytest.approx(0.3), "the record expires in 0.3 s"
    clock.now += 0.3
    assert await standby.try_acquire_or_renew()
    assert standby.next_attempt_in() == 1.0, "its own record: nothing to wait for"


async def test_two_standbys_racing_for_an_expired_lease_never_both_win(
    kube: KubeSim, client: KubeClient
) -> None:
    assert await LeaderElector(client, config("dead")).try_acquire_or_renew()
    clocks = [ManualClock(), ManualClock()]
    racers = [
        LeaderElector(client, config(name), clock=clock) for name, clock in zip("bc", clocks, strict=True)
    ]
    for racer in racers:
        assert not await racer.try_acquire_or_renew()
    for clock in clocks:
        clock.now += 3
    results = await asyncio.gather(*(racer.try_acquire_or_renew() for racer in racers))
    assert sorted(results) == [False, True]
    assert lease_holder(kube) in ("b", "c")


async def test_a_standby_prepares_its_first_window_once_the_leader_missed_renewals_and_drops_it_if_it_renews(
    kube: KubeSim, client: KubeClient
) -> None:
    """The standby's head start (observe/standby.py) follows the Lease as the elector reads it: prepared
    after ``silent_after`` seconds without a renewal, dropped when the leader renews after all, prepared
    again when it falls silent for good, and handed to the leader the standby becomes."""
    leader, standby, clock = await leader_and_standby(client)
    window = FirstWindow(
        listed=(), instances_listed=0, origin=None, watermark=None, clock_offset=0.0, states={}
    )

    async def prepare() -> FirstWindow:
        return window

    head_start = HeadStart(standby.silence, prepare, silent_after=1.0, check_every=0.05)
    assert not await standby.try_acquire_or_renew()
    head_start.check()
    clock.now += 0.9
    head_start.check()
    assert head_start.preparations == 0, "one missed renewal is no silence"
    clock.now += 0.2
    head_start.check()
    assert head_start.preparations == 1
    assert await leader.try_acquire_or_renew(), "the leader was only slow"
    assert not await standby.try_acquire_or_renew()
    head_start.check()
    assert head_start.preparations == 1
    clock.now += 1.1
    head_start.check()
    assert head_start.preparations == 2, "the first preparation was dropped: the leader fell silent again"
    clock.now += 2.0
    assert await standby.try_acquire_or_renew(), "the Lease's 3 s are up"
    head_start.check()
    prepared = head_start.take()
    assert prepared is not None and await prepared is window
    assert head_start.take() is None


async def test_a_standby_whose_preparation_failed_prepares_again_while_the_leader_stays_silent(
    kube: KubeSim, client: KubeClient
) -> None:
    _, standby, clock = await leader_and_standby(client)
    attempts = 0

    async def prepare() -> FirstWindow:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise KubeError(503, "the API server is busy")
        return FirstWindow(
            listed=(), instances_listed=0, origin=None, watermark=None, clock_offset=0.0, states={}
        )

    head_start = HeadStart(standby.silence, prepare, silent_after=1.0, check_every=0.05)
    assert not await standby.try_acquire_or_renew()
    clock.now += 1.5
    head_start.check()
    await asyncio.sleep(0.01)  # the first preparation runs, and fails
    head_start.check()
    assert head_start.preparations == 2
    prepared = head_start.take()
    assert prepared is not None
    assert (await prepared).instances_listed == 0 and attempts == 2


async def test_a_released_lease_is_taken_at_once(kube: KubeSim, client: KubeClient) -> None:
    leader = LeaderElector(client, config("a"))
    assert await leader.try_acquire_or_renew()
    standby = LeaderElector(client, config("b"), clock=ManualClock())
    assert not await standby.try_acquire_or_renew()
    await leader.release()
    assert lease_holder(kube) == ""
    assert await standby.try_acquire_or_renew(), "no need to wait for the lease duration"


async def test_a_leader_whose_lease_was_taken_over_stops_holding(kube: KubeSim, client: KubeClient) -> None:
    leader = LeaderElector(client, config("a"))
    assert await leader.try_acquire_or_renew()
    holding = asyncio.create_task(leader.hold())
    stored = kube.get_object(LEASE_GROUP, LEASE_VERSION, LEASE_PLURAL, NAMESPACE, "kiloclaw-operator")
    assert stored is not None
    stored["spec"]["holderIdentity"] = "usurper"
    await client.replace_lease(NAMESPACE, "kiloclaw-operator", stored)
    await asyncio.wait_for(holding, timeout=10)
    assert not leader.is_leader


async def test_a_leader_that_cannot_reach_the_api_server_stops_within_its_renew_deadline(
    kube: KubeSim, client: KubeClient
) -> None:
    leader = LeaderElector(client, config("a"))
    assert await leader.try_acquire_or_renew()
    holding = asyncio.create_task(leader.hold())
    await asyncio.to_thread(kube.stop_thread)
    await asyncio.wait_for(holding, timeout=10)
    assert not leader.is_leader


async def test_a_release_that_races_a_last_renewal_of_its_own_still_frees_the_lease_and_no_renewal_follows(
    kube: KubeSim, client: KubeClient
) -> None:
    leader = LeaderElector(client, config("a"))
    assert await leader.try_acquire_or_renew()
    # The last renewal, in flight when the renewals stopped, lands after the release read the Lease.
    assert await LeaderElector(client, config("a")).try_acquire_or_renew()
    await leader.release()
    assert lease_holder(kube) == ""
    assert not await leader.try_acquire_or_renew(), "a released elector never writes itself in again"
    assert lease_holder(kube) == ""


def renew_time(kube: KubeSim) -> str:
    lease = kube.get_object(LEASE_GROUP, LEASE_VERSION, LEASE_PLURAL, NAMESPACE, "kiloclaw-operator") or {}
    renewed: str = (lease.get("spec") or {}).get("renewTime") or ""
    return renewed


async def run_blocking_leader(kube: KubeSim, block_seconds: float, stall_seconds: float) -> list[str]:
    """A leader whose work blocks its event loop for ``block_seconds`` once it leads; returns the Lease's
    renewTime before and after the block. Raises LeadershipLost when the Lease is lost meanwhile."""
    election = ElectionLoop().start()
    leases = KubeClient(KubeConnection(server=kube.url, token="test"))
    elector = LeaderElector(leases, config("a", renew_deadline_seconds=0.5, retry_period_seconds=0.05))
    seen: list[str] = []

    async def serve(stop: asyncio.Event) -> None:
        seen.append(renew_time(kube))
        time.sleep(block_seconds)  # noqa: ASYNC251 - a burst that holds the loop (CPU work, a blocking call)
        seen.append(renew_time(kube))
        await asyncio.sleep(0.3)  # the loop runs again: the election notices a loss, if there was one
        stop_serving.set()

    stop_serving = asyncio.Event()
    try:
        await run_elected(
            elector, serve, election=election, loop_stall_seconds=stall_seconds, stop_flag=stop_serving
        )
    finally:
        await election.run(leases.aclose())
        election.stop()
    return seen


async def test_a_leader_whose_event_loop_is_busy_past_the_renew_deadline_keeps_renewing_its_lease(
    kube: KubeSim,
) -> None:
    before, after = await run_blocking_leader(kube, block_seconds=1.5, stall_seconds=10)
    assert after > before, "renewed from the election thread while the operator's loop was blocked"


async def test_a_leader_whose_event_loop_stopped_making_progress_stops_renewing_and_hands_over(
    kube: KubeSim,
) -> None:
    with pytest.raises(LeadershipLost):
        await run_blocking_leader(kube, block_seconds=2.0, stall_seconds=0.5)


# --- two operator processes -------------------------------------------------------------------------------


class TwoReplicas:
    def __init__(self, kube: KubeSim, fly: FlySimulator, workdir: Path) -> None:
        self.kube, self.fly, self.workdir = kube, fly, workdir
        self.kubeconfig = kube.write_kubeconfig(workdir / "kubeconfig")
        self.replicas: dict[str, OperatorProcess] = {}

    def start(self, identity: str, **env: str) -> OperatorProcess:
        replica = OperatorProcess(
            operator_env(self.fly.base_url, self.kubeconfig, identity, **env),
            self.workdir / f"operator-{identity}.log",
        ).start()
        self.replicas[identity] = replica
        return replica

    async def wait_role(self, replica: OperatorProcess, role: str, timeout: float = 60) -> None:
        async def check() -> bool | None:
            assert replica.alive, f"{replica.identity} exited:\n{replica.log_tail()}"
            return True if await replica.role() == role else None

        await eventually(check, timeout=timeout, what=f"{replica.identity} to be {role}")

    def instance(self, namespace: str, name: str) -> dict[str, Any]:
        return self.kube.get_object(GROUP, VERSION, INSTANCE_PLURAL, namespace, name) or {}

    async def wait_instance(self, namespace: str, name: str, predicate: Any, what: str) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            body = self.instance(namespace, name)
            return body if body and predicate(body.get("status") or {}) else None

        return await eventually(check, timeout=60, what=f"{namespace}/{name}: {what}")

    def stop_all(self) -> None:
        for replica in self.replicas.values():
            replica.kill()


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[TwoReplicas]:
    with processes.simulators() as (kube, fly):
        pair = TwoReplicas(kube, fly, tmp_path)
        try:
            yield pair
        finally:
            pair.stop_all()


def create_instance(kube: KubeSim, namespace: str, name: str) -> None:
    kube.create_namespace(namespace)
    processes.create_instance(kube, namespace, name, "acct-ha", sandbox=f"ki_{name}")


def live_machines(fly: FlySimulator, sandbox_id: str) -> list[dict[str, Any]]:
    return [
        m
        for m in fly.machines("acct-ha")
        if m["state"] not in ("destroyed", "destroying")
        and (m.get("config") or {}).get("metadata", {}).get("kiloclaw_sandbox_id") == sandbox_id
    ]


async def leader_standby_and_a_running_instance(
    replicas: TwoReplicas,
) -> tuple[OperatorProcess, OperatorProcess, str]:
    """replica-a leads, replica-b stands by, and ha/alice runs; returns them and alice's machine id."""
    leader = replicas.start("replica-a")
    await replicas.wait_role(leader, "leader")
    standby = replicas.start("replica-b")
    await replicas.wait_role(standby, "standby")
    create_instance(replicas.kube, "ha", "alice")
    running = await replicas.wait_instance("ha", "alice", lambda s: s.get("phase") == "Running", "Running")
    machine_id: str = running["status"]["machineId"]
    return leader, standby, machine_id


@pytest.mark.xdist_group("operator-processes")
@pytest.mark.slow  # two operator processes
async def test_the_standby_finishes_a_recovery_whose_leader_was_sigkilled_mid_step(
    replicas: TwoReplicas,
) -> None:
    leader, standby, source_machine = await leader_standby_and_a_running_instance(replicas)

    # The replacement machine's create is slow, so the kill lands inside the recovery.
    replicas.fly.set_latency(1.5, route="POST /v1/apps/*/machines")
    replicas.fly.crash_machine(source_machine)
    await replicas.wait_instance(
        "ha",
        "alice",
        lambda s: (s.get("recovery") or {}).get("step") == "ReplacementVolumeCreated",
        "recovery step ReplacementVolumeCreated recorded",
    )
    leader.kill()

    await replicas.wait_role(standby, "leader")
    assert lease_holder(replicas.kube) == "replica-b"
    done = await replicas.wait_instance(
        "ha",
        "alice",
        lambda s: s.get("phase") == "Running" and not s.get("recovery") and s.get("lastRecovery"),
        "the standby finished the recovery",
    )
    status = done["status"]
    assert status["lastRecovery"]["outcome"] == "Succeeded"
    assert status["machineId"] != source_machine
    machines = live_machines(replicas.fly, "ki_alice")
    assert [m["id"] for m in machines] == [status["machineId"]]
    assert [mount["volume"] for mount in machines[0]["config"]["mounts"]] == [status["volumeId"]]


MUTATING = ("POST", "DELETE", "PUT", "PATCH")


@pytest.mark.xdist_group("operator-processes")
@pytest.mark.slow  # two operator processes
async def test_a_leader_paused_past_its_lease_writes_and_sends_nothing_after_the_standby_took_over(
    replicas: TwoReplicas,
) -> None:
    leader, standby, source_machine = await leader_standby_and_a_running_instance(replicas)

    # Freeze the leader while its read of the machine is in flight: the read answers `stopped` while it
    # sleeps. The standby takes over and recovers; the recovery the old leader would begin on waking must not
    # be written over the standby's record.
    replicas.fly.set_latency(2.0, route="GET /v1/apps/*/machines/*")
    replicas.fly.crash_machine(source_machine)
    leader.pause()
    try:
        replicas.fly.set_latency(0.0, route="GET /v1/apps/*/machines/*")
        await replicas.wait_role(standby, "leader")
        done = await replicas.wait_instance(
            "ha",
            "alice",
            lambda s: s.get("phase") == "Running" and not s.get("recovery") and s.get("lastRecovery"),
            "the standby finished the recovery",
        )
        fly_requests_before = len(replicas.fly.request_log)
    finally:
        leader.resume()

    async def exited() -> bool | None:
        return True if not leader.alive else None

    await eventually(exited, timeout=30, what="the paused leader to notice it lost the Lease and exit")
    assert "leadership lost" in leader.log_tail(200)
    after = replicas.instance("ha", "alice")["status"]
    assert after.get("machineId") == done["status"]["machineId"] != source_machine
    assert after.get("recovery") is None, "the old leader's stale recovery record was not written"
    assert after["lastRecovery"] == done["status"]["lastRecovery"]
    changed_on_fly = [
        f"{r.method} {r.path}" for r in replicas.fly.request_log[fly_requests_before:] if r.method in MUTATING
    ]
    assert changed_on_fly == [], "the old leader changed nothing on Fly once resumed"
    assert lease_holder(replicas.kube) == "replica-b"


@pytest.mark.xdist_group("operator-processes")
@pytest.mark.slow  # two operator processes
async def test_a_leader_stopped_gracefully_releases_the_lease_for_its_standby(replicas: TwoReplicas) -> None:
    # A long lease: only a release lets the standby in before it would expire.
    long_lease = {"KILOCLAW_LEASE_DURATION_SECONDS": "120", "KILOCLAW_LEASE_RENEW_DEADLINE_SECONDS": "60"}
    leader = replicas.start("replica-a", **long_lease)
    await replicas.wait_role(leader, "leader")
    assert lease_holder(replicas.kube) == "replica-a"
    assert await asyncio.to_thread(leader.terminate) == 0
    assert lease_holder(replicas.kube) == "", "released on SIGTERM"
    standby = replicas.start("replica-b", **long_lease)
    await replicas.wait_role(standby, "leader", timeout=30)


async def test_a_leader_acts_only_while_its_last_renewal_is_within_the_renew_deadline(
    kube: KubeSim, client: KubeClient
) -> None:
    clock = ManualClock()
    leader = LeaderElector(client, config("a", renew_deadline_seconds=5), clock=clock)
    assert not leader.acting(), "a candidate never acts"
    assert await leader.try_acquire_or_renew()
    assert leader.acting()
    clock.now += 4.9
    assert leader.acting()
    clock.now += 0.2
    assert not leader.acting(), "a renewal is overdue: a standby may take over soon"
    assert await leader.try_acquire_or_renew()
    assert leader.acting()


@pytest.mark.xdist_group("operator-processes")
@pytest.mark.slow  # two operator processes
async def test_a_standby_prepares_the_feeds_first_window_while_its_sigkilled_leader_is_silent_and_recovers(
    replicas: TwoReplicas,
) -> None:
    """With the organisation feed, the standby lists the instances and sweeps the feed once the leader's
    renewals stop, before the Lease is its own; as leader it adopts that window (lists the instances no more
    before its first passes) and recovers the machine that crashed while no operator ran."""
    feed = {"FLY_ORG_SLUG": "kilo", "KILOCLAW_FEED_INTERVAL_SECONDS": "0.2"}
    leader = replicas.start("replica-a", **feed)
    await replicas.wait_role(leader, "leader")
    standby = replicas.start("replica-b", **feed)
    await replicas.wait_role(standby, "standby")
    create_instance(replicas.kube, "ha", "alice")
    running = await replicas.wait_instance("ha", "alice", lambda s: s.get("phase") == "Running", "Running")
    source_machine = running["status"]["machineId"]

    leader.kill()
    replicas.fly.crash_machine(source_machine)
    await replicas.wait_role(standby, "leader")
    done = await replicas.wait_instance(
        "ha",
        "alice",
        lambda s: s.get("phase") == "Running" and (s.get("lastRecovery") or {}).get("outcome") == "Succeeded",
        "the new leader recovered the machine that crashed while no operator ran",
    )
    assert done["status"]["machineId"] != source_machine
    log = standby.log_path.read_text(errors="replace")
    assert "preparing the feed's first window" in log
    assert "the first window prepared as a standby is adopted" in log, standby.log_tail()
    assert "machines changed while no operator ran" in log
