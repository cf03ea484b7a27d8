"""The control loop's plan: stale actions dropped, overlaps crossfaded, the lead taken from measured latency."""

import numpy as np
import pytest

from rtdiff_client.loop import ChunkPlan, RemoteController


def chunk(value, length=8):
    return np.full((length, 2), float(value), np.float32)


def test_a_chunk_into_an_empty_plan_drops_what_is_already_past():
    plan = ChunkPlan()
    plan.merge(start_tick=10, chunk=chunk(1), now=12)  # asked at tick 10, arrived at tick 12
    assert sorted(plan.actions) == list(range(12, 18))
    assert plan.remaining(12) == 6 and plan.remaining(16) == 2


def test_overlapping_chunks_crossfade_from_old_to_new():
    plan = ChunkPlan()
    plan.merge(0, chunk(0), now=0)  # ticks 0..7 planned at 0.0
    plan.merge(4, chunk(1), now=5)  # ticks 4..11 at 1.0; tick 4 is past; 5, 6, 7 overlap
    values = {t: float(a[0]) for t, a in plan.actions.items()}
    assert values == pytest.approx({5: 0.25, 6: 0.5, 7: 0.75, 8: 1.0, 9: 1.0, 10: 1.0, 11: 1.0})


def test_pop_returns_this_ticks_action_and_forgets_the_past():
    plan = ChunkPlan()
    plan.merge(0, np.arange(16, dtype=np.float32).reshape(8, 2), now=0)
    np.testing.assert_array_equal(plan.pop(3), [6, 7])
    assert min(plan.actions) == 4 and plan.pop(3) is None


def test_lead_covers_the_slow_end_of_the_round_trip():
    controller = RemoteController.__new__(RemoteController)
    controller.dt, controller.margin_ticks = 0.1, 1
    controller.client_ms = [20.0] * 40 + [250.0] * 10  # p90 is in the slow tail: 250 ms = 2.5 ticks
    assert controller.lead == 3 + 1
    controller.client_ms = [20.0] * 50
    assert controller.lead == 1 + 1
