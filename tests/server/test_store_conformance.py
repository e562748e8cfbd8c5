"""One suite for every `Store`: the SQLite store (the server's default) and the in-memory one.

`StoreConformance` holds the tests; each subclass says how to make its store. Prepare / execute /
assert in each test, through the protocol only.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import pytest

from pum.common.errors import Conflict, LeaseExpired, NotFound
from pum.common.states import END_STATES, JOB_TRANSITIONS, CopyState, JobState, LeaseState, RoundState
from pum.server.store import JobSpec, MemoryStore, SqliteStore, Store

TTL = 30.0
SPEC = JobSpec(model_dir="/m", pum={"copies_m": 3}, hyperparams={"lr": 0.1}, dtypes={"w": "BF16"},
               clip_norms=None, has_base=False, group_sizes={"global": 6})
# a path from `created` to each state, through allowed transitions only
PATH_TO = {
    JobState.CREATED: [], JobState.RUNNING: [JobState.RUNNING], JobState.PAUSED: [JobState.RUNNING, JobState.PAUSED],
    JobState.ABORTED: [JobState.ABORTED], JobState.FINALIZED: [JobState.RUNNING, JobState.FINALIZED],
    JobState.FAILED: [JobState.RUNNING, JobState.FAILED],
}


class StoreConformance:
    def make(self, clock, folder: Path) -> Store:
        """A new store over `folder` whose time is `clock` (the `clock` fixture: a settable FakeClock)."""
        raise NotImplementedError

    @pytest.fixture
    def store(self, clock, tmp_path):
        store = self.make(clock, tmp_path)
        yield store
        store.close()

    def running_job(self, store: Store, job_id: str = "job-1", m: int = 3) -> str:
        store.insert_job(job_id, f"task-{job_id}", SPEC)
        store.open_round(job_id, 1, m, {"global": 0.5}, {"global": 0.0})
        store.set_job_state(job_id, JobState.RUNNING)
        return job_id

    # ---- jobs --------------------------------------------------------------------------------
    def test_a_job_is_stored_as_given(self, store, clock):
        job = store.insert_job("job-1", "task", SPEC)
        clock.now += 5
        store.insert_job("job-2", "other", SPEC)
        assert (job.id, job.task, job.state, job.round, job.spec) == ("job-1", "task", JobState.CREATED, 0, SPEC)
        assert job.created_at == job.updated_at == 1_000_000.0 and job.error is None and job.output_dir is None
        assert store.job("job-1") == job and store.job("nope") is None
        assert [j.id for j in store.jobs()] == ["job-1", "job-2"]
        assert store.job("job-1").spec.settings.copies_m == 3

    @pytest.mark.parametrize("source, target", list(itertools.product(JobState, JobState)))
    def test_job_states_move_only_as_the_table_allows(self, store, clock, source, target):
        store.insert_job("job-1", "task", SPEC)
        for state in PATH_TO[source]:
            store.set_job_state("job-1", state)
        before = store.job("job-1")
        clock.now += 1
        if target in JOB_TRANSITIONS[source]:
            after = store.set_job_state("job-1", target, error="why", output_dir="/out")
            assert after == store.job("job-1")
            assert (after.state, after.error, after.output_dir, after.updated_at) == (target, "why", "/out", clock.now)
        else:
            with pytest.raises(Conflict, match=f"is {source}: it cannot become {target}"):
                store.set_job_state("job-1", target)
            assert store.job("job-1") == before

    def test_state_of_an_unknown_job_is_refused(self, store):
        with pytest.raises(Conflict, match="no job"):
            store.set_job_state("nope", JobState.RUNNING)

    @pytest.mark.parametrize("end", [JobState.ABORTED, JobState.FINALIZED, JobState.FAILED])
    def test_an_ended_job_ends_its_live_leases_and_frees_their_copies(self, store, end):
        job = self.running_job(store)
        done = store.grant_lease("lease-a", job, 1, "h", TTL, None)
        store.accept_copy(done, 1.0, "s1_1.safetensors")
        live = store.grant_lease("lease-b", job, 1, "h", TTL, None)
        store.set_job_state(job, end)
        assert store.lease(live.id).state is LeaseState.CANCELLED
        assert store.lease(done.id).state is LeaseState.DONE
        assert {c.k: (c.state, c.lease_id) for c in store.copies(job, 1)} == {
            k: (CopyState.ACCEPTED, "lease-a") if k == done.k else (CopyState.PENDING, None) for k in range(3)}
        assert store.grant_lease("lease-c", job, 1, "h", TTL, None) is None

    def test_a_task_belongs_to_one_job_until_it_is_deleted(self, store):
        store.insert_job("job-1", "task", SPEC)
        with pytest.raises(Conflict, match="task 'task' belongs to job job-1"):
            store.insert_job("job-2", "task", SPEC)
        assert [j.id for j in store.jobs()] == ["job-1"]
        store.set_job_state("job-1", JobState.ABORTED)
        store.delete_job("job-1")
        assert store.insert_job("job-2", "task", SPEC).task == "task"

    @pytest.mark.parametrize("state", sorted(PATH_TO))
    def test_only_an_ended_job_can_be_deleted(self, store, state):
        store.insert_job("job-1", "task", SPEC)
        for step in PATH_TO[state]:
            store.set_job_state("job-1", step)
        before = store.job("job-1")
        if state in END_STATES:
            assert store.delete_job("job-1") == before and store.job("job-1") is None and store.jobs() == []
        else:
            with pytest.raises(Conflict, match=f"job job-1 is {state}: only an ended job"):
                store.delete_job("job-1")
            assert store.job("job-1") == before
        with pytest.raises(NotFound):
            store.delete_job("job-9")

    def test_a_deleted_job_leaves_no_token_round_copy_or_lease(self, store):
        job = self.running_job(store)
        other = self.running_job(store, "job-2")
        store.insert_token("hash-1", job, "gpu0")
        store.insert_token("hash-2", other, "gpu0")
        store.grant_lease("lease-a", job, 1, "hash-1", TTL, None)
        store.grant_lease("lease-b", other, 1, "hash-2", TTL, None)
        store.set_job_state(job, JobState.ABORTED)
        store.delete_job(job)
        assert store.token_job("hash-1") is None and store.token_parties(job) == {}
        assert store.rounds(job) == [] and store.copies(job, 1) == [] and store.lease("lease-a") is None
        assert store.leases(job) == []
        assert store.token_job("hash-2") == other and store.lease("lease-b").state is LeaseState.ACTIVE  # untouched
        assert len(store.copies(other, 1)) == 3

    # ---- tokens ------------------------------------------------------------------------------
    def test_tokens_resolve_to_their_job_and_count_by_party(self, store):
        store.insert_job("job-1", "task", SPEC)
        store.insert_job("job-2", "other", SPEC)
        store.insert_token("hash-1", "job-1", "gpu0")
        store.insert_token("hash-2", "job-1", "gpu1", party="lab-a")
        store.insert_token("hash-3", "job-1", "gpu2", party="lab-a")
        store.insert_token("hash-4", "job-2", "gpu0", party="lab-b")
        assert store.token_job("hash-1") == "job-1" and store.token_job("hash-9") is None
        assert store.token_parties("job-1") == {"": 1, "lab-a": 2} and store.token_parties("job-3") == {}
        assert store.token_labels("job-1") == {"hash-1": "gpu0", "hash-2": "gpu1", "hash-3": "gpu2"}
        assert store.token_labels("job-2") == {"hash-4": "gpu0"} and store.token_labels("job-3") == {}

    # ---- rounds and copies ---------------------------------------------------------------------
    def test_an_opened_round_has_m_pending_copies_and_becomes_current(self, store, clock):
        store.insert_job("job-1", "task", SPEC)
        rnd = store.open_round("job-1", 1, 3, {"layer.0": 0.1, "global": 0.2}, {"layer.0": 0.0, "global": 0.05})
        assert rnd == store.round("job-1", 1) and store.rounds("job-1") == [rnd]
        assert (rnd.state, rnd.s0, rnd.accepted, rnd.s1_file, rnd.sigmas, rnd.taus) == (
            RoundState.OPEN, 0.0, 0, None, {"layer.0": 0.1, "global": 0.2}, {"layer.0": 0.0, "global": 0.05})
        assert rnd.started_at == clock.now and rnd.finished_at is None
        assert [(c.k, c.state, c.leases, c.failures) for c in store.copies("job-1", 1)] == [
            (k, CopyState.PENDING, 0, 0) for k in range(3)]
        assert store.job("job-1").round == 1 and store.round("job-1", 2) is None

    def test_a_finished_round_is_merged_once(self, store, clock):
        job = self.running_job(store)
        clock.now += 7
        store.finish_round(job, 1)
        store.open_round(job, 2, 3, {"global": 0.5}, {"global": 0.0})
        clock.now += 1
        store.finish_round(job, 1)  # a second finish (crash recovery) changes nothing
        first, second = store.rounds(job)
        assert (first.state, first.finished_at) == (RoundState.MERGED, 1_000_007.0)
        assert second.state is RoundState.OPEN and store.job(job).round == 2

    # ---- leases ------------------------------------------------------------------------------
    def test_a_lease_takes_a_pending_copy_for_its_ttl(self, store, clock):
        job = self.running_job(store)
        first = store.grant_lease("lease-a", job, 1, "h", TTL, None)
        clock.now += 2
        second = store.grant_lease("lease-b", job, 1, "h", TTL, None)
        assert first.k != second.k and {first.k, second.k} <= {0, 1, 2}
        assert (second.state, second.created_at, second.expires_at) == (LeaseState.ACTIVE, clock.now, clock.now + TTL)
        assert store.lease("lease-b") == second and store.lease("nope") is None
        assert [l.id for l in store.leases(job)] == ["lease-a", "lease-b"]
        copy = store.copies(job, 1)[second.k]
        assert (copy.state, copy.lease_id, copy.leases, copy.leased_at) == (CopyState.LEASED, "lease-b", 1, clock.now)

    def test_copies_are_granted_in_random_order(self, store):
        """The order of the leases says nothing about k: over many rounds every copy comes first."""
        job = self.running_job(store, m=3)
        first = set()
        for round_ in range(2, 60):
            store.finish_round(job, round_ - 1)
            store.open_round(job, round_, 3, {"global": 0.5}, {"global": 0.0})
            first.add(store.grant_lease(f"lease-{round_}", job, round_, "h", TTL, None).k)
        assert first == {0, 1, 2}

    def test_no_lease_when_no_copy_is_free_or_the_job_is_not_running_in_that_round(self, store):
        job = self.running_job(store, m=2)
        assert store.grant_lease("lease-x", job, 2, "h", TTL, None) is None  # not the current round
        store.grant_lease("lease-a", job, 1, "h", TTL, None)
        store.grant_lease("lease-b", job, 1, "h", TTL, None)
        assert store.grant_lease("lease-c", job, 1, "h", TTL, None) is None  # all copies out
        store.release_lease("lease-a", failed=False)
        store.set_job_state(job, JobState.PAUSED)
        assert store.grant_lease("lease-d", job, 1, "h", TTL, None) is None  # paused
        assert [l.id for l in store.leases(job)] == ["lease-a", "lease-b"]

    def test_the_copy_cap_counts_distinct_copies_of_a_round_per_token(self, store, clock):
        job = self.running_job(store, m=4)
        store.insert_token("greedy", job, "w1")
        store.insert_token("modest", job, "w2")
        taken = {store.grant_lease(f"lease-{i}", job, 1, "greedy", TTL, 2).k for i in range(2)}
        assert len(taken) == 2 and store.grant_lease("lease-x", job, 1, "greedy", TTL, 2) is None
        clock.now += TTL + 1
        store.expire_leases()  # its copies are free again, but it has had its 2
        assert store.grant_lease("lease-y", job, 1, "greedy", TTL, 2) is None
        modest = store.grant_lease("lease-z", job, 1, "modest", TTL, 2)
        assert modest is not None
        assert store.largest_party_leases(job) == len(taken | {modest.k})  # both tokens: the job's one data owner

    def test_largest_party_leases_groups_tokens_by_party(self, store):
        job = self.running_job(store, m=6)
        for token, party in (("a1", "lab-a"), ("a2", "lab-a"), ("b1", "lab-b")):
            store.insert_token(token, job, token, party)
        for i, token in enumerate(("a1", "a2", "a2", "b1")):
            store.grant_lease(f"lease-{i}", job, 1, token, TTL, None)
        assert store.largest_party_leases(job) == 3

    def test_largest_party_leases_is_none_before_any_lease(self, store):
        assert store.largest_party_leases(self.running_job(store)) is None

    def test_expired_leases_give_their_copies_back(self, store, clock):
        job = self.running_job(store, m=2)
        old = store.grant_lease("lease-a", job, 1, "h", TTL, None)
        clock.now += 10
        young = store.grant_lease("lease-b", job, 1, "h", TTL, None)
        clock.now += TTL - 5  # past the first lease's expiry only
        assert [l.id for l in store.expire_leases()] == [old.id]
        assert store.expire_leases() == []
        assert store.lease(old.id).state is LeaseState.EXPIRED and store.lease(young.id).state is LeaseState.ACTIVE
        assert {c.k: c.state for c in store.copies(job, 1)} == {old.k: CopyState.PENDING, young.k: CopyState.LEASED}
        assert store.grant_lease("lease-c", job, 1, "h", TTL, None).k == old.k

    def test_only_an_active_lease_is_extended(self, store, clock):
        job = self.running_job(store)
        lease = store.grant_lease("lease-a", job, 1, "h", TTL, None)
        clock.now += 20
        assert store.extend_lease(lease.id, TTL) and store.lease(lease.id).expires_at == clock.now + TTL
        clock.now += TTL + 1
        store.expire_leases()
        assert not store.extend_lease(lease.id, TTL) and not store.extend_lease("nope", TTL)
        assert store.lease(lease.id).state is LeaseState.EXPIRED

    @pytest.mark.parametrize("failed, state", [(True, LeaseState.FAILED), (False, LeaseState.RELEASED)])
    def test_a_released_lease_gives_its_copy_back_once(self, store, failed, state):
        job = self.running_job(store)
        lease = store.grant_lease("lease-a", job, 1, "h", TTL, None)
        released = store.release_lease(lease.id, failed=failed, reason="out of memory")
        assert (released.state, released.reason) == (state, "out of memory")
        assert store.release_lease(lease.id, failed=failed, reason="again") is None
        assert store.lease(lease.id).reason == "out of memory" and store.leases(job)[0].reason == "out of memory"
        copy = store.copies(job, 1)[lease.k]
        assert (copy.state, copy.lease_id, copy.failures, copy.leases) == (CopyState.PENDING, None, int(failed), 1)

    def test_a_revoked_lease_gives_its_copy_back_without_a_failure(self, store):
        job = self.running_job(store)
        lease = store.grant_lease("lease-a", job, 1, "h", TTL, None)
        assert store.revoke_lease(lease.id).state is LeaseState.REVOKED
        assert store.revoke_lease(lease.id) is None and store.revoke_lease("nope") is None
        copy = store.copies(job, 1)[lease.k]
        assert (copy.state, copy.lease_id, copy.failures) == (CopyState.PENDING, None, 0)
        assert not store.extend_lease(lease.id, TTL)

    def test_revoking_a_label_ends_its_tokens_and_their_live_leases_only(self, store):
        job, other = self.running_job(store), self.running_job(store, "job-2")
        for token_hash, job_id, label in [("h1", job, "hoarder"), ("h2", job, "hoarder"), ("h3", job, "honest"),
                                          ("h4", other, "hoarder")]:
            store.insert_token(token_hash, job_id, label, "p")
        done = store.grant_lease("lease-d", job, 1, "h1", TTL, None)
        store.accept_copy(done, 1.0, "s1_1.safetensors")
        live = store.grant_lease("lease-a", job, 1, "h2", TTL, None)
        kept = store.grant_lease("lease-b", job, 1, "h3", TTL, None)
        elsewhere = store.grant_lease("lease-c", other, 1, "h4", TTL, None)
        revoked, ended = store.revoke_tokens(job, "hoarder")
        assert revoked == 2 and [(l.id, l.state) for l in ended] == [("lease-a", LeaseState.REVOKED)]
        assert store.token_job("h1") is None and store.token_job("h2") is None
        assert store.token_job("h3") == job and store.token_job("h4") == other
        assert store.copies(job, 1)[live.k].state is CopyState.PENDING
        assert store.lease(done.id).state is LeaseState.DONE
        assert store.lease(kept.id).state is store.lease(elsewhere.id).state is LeaseState.ACTIVE
        assert store.token_parties(job) == {"p": 3}  # revoked tokens still count for the privacy report
        assert store.revoke_tokens(job, "hoarder") == (0, [])

    def test_an_accepted_copy_commits_s0_s1_and_states_together(self, store, clock):
        job = self.running_job(store)
        lease = store.grant_lease("lease-a", job, 1, "h", TTL, None)
        clock.now += 3
        store.accept_copy(lease, 0.75, "s1_1.safetensors")
        rnd, copy = store.round(job, 1), store.copies(job, 1)[lease.k]
        assert (rnd.s0, rnd.s1_file, rnd.accepted) == (0.75, "s1_1.safetensors", 1)
        assert (copy.state, copy.accepted_at) == (CopyState.ACCEPTED, clock.now)
        assert store.lease(lease.id).state is LeaseState.DONE

    def test_an_accepted_copy_keeps_its_update_sums_exactly(self, store):
        job = self.running_job(store)
        plain, clipped = (store.grant_lease(f"lease-{x}", job, 1, "h", TTL, None) for x in "ab")
        store.accept_copy(plain, 0.5, "s1_1.safetensors")
        sums = {"global": 0.1 + 0.2, "layer_0": 1e-300, "layer_1": 12345.678901234567}
        store.accept_copy(clipped, 1.0, "s1_2.safetensors", sums)
        copies = {c.k: c for c in store.copies(job, 1)}
        assert copies[plain.k].update_sums is None
        assert copies[clipped.k].update_sums == sums  # float64 values, bit for bit

    def test_a_copy_counts_once(self, store):
        job = self.running_job(store)
        lease = store.grant_lease("lease-a", job, 1, "h", TTL, None)
        store.accept_copy(lease, 0.75, "s1_1.safetensors")
        with pytest.raises(LeaseExpired):
            store.accept_copy(lease, 1.5, "s1_2.safetensors")
        assert (store.round(job, 1).s0, store.round(job, 1).accepted) == (0.75, 1)

    def test_an_expired_lease_is_never_accepted_even_after_its_copy_moved_on(self, store, clock):
        job = self.running_job(store, m=1)
        late = store.grant_lease("lease-a", job, 1, "h", TTL, None)
        clock.now += TTL + 1
        store.expire_leases()
        fresh = store.grant_lease("lease-b", job, 1, "h", TTL, None)
        assert fresh.k == late.k
        with pytest.raises(LeaseExpired, match="lease-a"):
            store.accept_copy(late, 0.5, "s1_1.safetensors")
        rnd = store.round(job, 1)
        assert (rnd.s0, rnd.accepted, rnd.s1_file) == (0.0, 0, None)
        assert store.copies(job, 1)[late.k].lease_id == "lease-b" and store.lease("lease-b").state is LeaseState.ACTIVE

    def test_racing_grants_never_share_a_copy(self, store):
        job = self.running_job(store, m=24)
        granted: list = []
        start = threading.Barrier(8)

        def grab(worker: int) -> None:
            start.wait()
            for i in range(5):
                granted.append(store.grant_lease(f"lease-{worker}-{i}", job, 1, f"h{worker}", TTL, None))

        threads = [threading.Thread(target=grab, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        leases = [lease for lease in granted if lease is not None]
        assert sorted(lease.k for lease in leases) == list(range(24)) and granted.count(None) == 16
        assert {c.lease_id for c in store.copies(job, 1)} == {lease.id for lease in leases}


class TestSqliteStore(StoreConformance):
    def make(self, clock, folder):
        return SqliteStore(folder / "state.db", clock)

    def test_committed_state_survives_a_reopen(self, clock, tmp_path):
        store = self.make(clock, tmp_path)
        job = self.running_job(store)
        store.accept_copy(store.grant_lease("lease-a", job, 1, "h", TTL, None), 0.5, "s1_1.safetensors")
        store.grant_lease("lease-b", job, 1, "h", TTL, None)  # lease bookkeeping: committed without an fsync
        store.close()
        reopened = self.make(clock, tmp_path)
        assert reopened.round(job, 1).accepted == 1 and reopened.job(job).state is JobState.RUNNING
        assert reopened.lease("lease-a").state is LeaseState.DONE and reopened.lease("lease-b").state is LeaseState.ACTIVE
        reopened.close()


    def test_round_state_is_synced_to_disk_and_lease_bookkeeping_is_not(self, clock, tmp_path, monkeypatch):
        """What a crash must not undo (an accepted copy) is fsynced before the call returns; a
        grant is not (a lost grant only sends a worker back for a new lease)."""
        import os

        store = self.make(clock, tmp_path)
        job = self.running_job(store)
        synced, real_fsync = [], os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real_fsync(fd)))
        lease = store.grant_lease("lease-a", job, 1, "h", TTL, None)
        store.extend_lease(lease.id, TTL)
        assert synced == []
        store.accept_copy(lease, 0.5, "s1_1.safetensors")
        assert (tmp_path / "state.db-wal").stat().st_ino in synced
        store.close()


class TestMemoryStore(StoreConformance):
    def make(self, clock, folder):
        return MemoryStore(clock)
