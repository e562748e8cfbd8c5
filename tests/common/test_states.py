"""The state tables: complete, consistent with each other, and with the admin actions."""

from __future__ import annotations

import pytest

from pum.common.states import (
    ACTIONS, COPY_TRANSITIONS, END_STATES, JOB_TRANSITIONS, LEASE_TRANSITIONS, ROUND_TRANSITIONS, TAKES_UPLOADS,
    CopyState, JobAction, JobState, LeaseState, RoundState, sources,
)


@pytest.mark.parametrize("table, enum", [(JOB_TRANSITIONS, JobState), (ROUND_TRANSITIONS, RoundState),
                                         (COPY_TRANSITIONS, CopyState), (LEASE_TRANSITIONS, LeaseState)])
def test_every_state_has_a_row_and_moves_only_to_states_of_its_kind(table, enum):
    assert set(table) == set(enum)
    assert all(set(targets) <= set(enum) and state not in targets for state, targets in table.items())


def test_end_states_are_the_jobs_that_go_nowhere():
    assert END_STATES == {JobState.FINALIZED, JobState.ABORTED, JobState.FAILED}
    assert not END_STATES & TAKES_UPLOADS and JobState.CREATED not in TAKES_UPLOADS


def test_every_action_moves_along_the_table():
    assert set(ACTIONS) == set(JobAction)
    for action, (allowed, target, doc) in ACTIONS.items():
        assert allowed and doc.endswith(".")
        if target is not None:
            assert allowed <= sources(JOB_TRANSITIONS, target), action


def test_states_print_and_compare_as_their_words():
    assert f"job is {JobState.RUNNING}" == "job is running" and str(LeaseState.DONE) == "done"
    assert JobState("paused") is JobState.PAUSED and CopyState.LEASED == "leased"


def test_a_lease_ends_once_and_a_copy_is_accepted_once():
    assert sources(LEASE_TRANSITIONS, LeaseState.DONE) == {LeaseState.ACTIVE}
    assert sources(COPY_TRANSITIONS, CopyState.ACCEPTED) == {CopyState.LEASED} and not COPY_TRANSITIONS[CopyState.ACCEPTED]
