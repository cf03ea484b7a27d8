"""PushT: the shipped demonstrations, the expert, and the demonstration file format."""

import numpy as np
import pytest

from rtdiff.sims.tasks import TASKS

DEMOS_PATH = TASKS["pusht"].demos
from rtdiff.sims.demos import load_demos, save_demos
from rtdiff.sims.pusht import Episode, demonstration, make_env


@pytest.fixture(scope="module")
def demos():
    return load_demos(DEMOS_PATH)


def test_shipped_demonstrations_describe_themselves(demos):
    assert demos.episodes == 200
    assert demos.meta["command"] == "rtdiff demos pusht --episodes 200 --seed 0"
    assert demos.observations.shape[1:] == (5,) and demos.actions.shape[1:] == (2,)
    assert np.all((demos.actions >= 0) & (demos.actions <= 512))


def test_demonstrations_replay_in_the_simulator(demos):
    """Episode k was recorded from seed k: replaying its actions reproduces its observations."""
    env = make_env()
    for k in (0, 57):
        obs_recorded, actions = demos.episode(k)
        obs, _ = env.reset(seed=k)
        replayed = [obs]
        for action in actions[:-1]:
            obs, *_ = env.step(action)
            replayed.append(obs)
        np.testing.assert_allclose(np.stack(replayed), obs_recorded, atol=1e-3)
    env.close()


def test_expert_solves_unseen_starts():
    from rtdiff.sims.pusht import run_episodes
    from rtdiff.sims.pusht_expert import PushTExpert

    episodes = run_episodes(PushTExpert(), [100_000, 100_001], progress=False)
    assert np.mean([e.score for e in episodes]) > 0.9


def test_demonstration_ends_at_the_best_moment():
    rewards = np.array([0.1, 0.5, 0.9, 0.7, 0.2], dtype=np.float32)
    episode = Episode(0, 0.9, 0.9, False, 5, np.zeros((5, 5)), np.arange(10.0).reshape(5, 2), rewards)
    obs, actions = demonstration(episode)
    assert len(obs) == len(actions) == 3


def test_demos_file_round_trip_and_bad_files(tmp_path):
    episodes = [(np.ones((3, 5)), np.ones((3, 2))), (np.zeros((4, 5)), np.zeros((4, 2)))]
    save_demos(tmp_path / "d.safetensors", episodes, {"task": "test"})
    demos = load_demos(tmp_path / "d.safetensors")
    assert demos.episodes == 2 and demos.meta == {"task": "test"}
    np.testing.assert_array_equal(demos.episode(1)[0], np.zeros((4, 5)))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_demos(tmp_path / "missing.safetensors")
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an rtdiff demonstrations file"):
        load_demos(tmp_path / "other.safetensors")
