"""robosuite Lift: seeded episodes are reproducible, and the scripted expert lifts the cube."""

import numpy as np
import pytest

lift = pytest.importorskip("rtdiff.sims.robosuite_lift")


@pytest.fixture(scope="module")
def env():
    env = lift.make_env()
    yield env
    env.close()


def test_a_seed_fixes_the_start_and_different_seeds_differ(env):
    first, again, other = lift.reset(env, 3), lift.reset(env, 3), lift.reset(env, 4)
    assert first.shape == (lift.OBS_DIM,) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first[9:12], other[9:12])  # the cube is somewhere else


def test_the_expert_lifts_the_cube_by_robosuites_own_check(env):
    episodes = [lift.run_episode(env, lift.LiftExpert(), seed) for seed in (100_000, 100_001)]
    assert all(e.success for e in episodes)
    assert all(e.steps < lift.MAX_STEPS for e in episodes)  # it ends at the lift, not by running out of time
    assert episodes[0].actions.shape == (episodes[0].steps, lift.ACTION_DIM)
    assert np.abs(episodes[0].actions).max() <= 1.0
