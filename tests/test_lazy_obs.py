"""Lazy observations: evaluation skips the point clouds no policy sees, with identical observations."""

import numpy as np
import pytest
from difftori.eval.multistep import MultiStepWrapper
from difftori.eval.suites.metaworld import MetaWorldExpert, make_env

TASK, SEED = "sweep-into", 5


def expert_actions(steps: int) -> np.ndarray:
    """The scripted expert's actions from ``SEED`` (closed loop on ``state``; it succeeds mid-run)."""
    env, expert = (
        make_env(TASK, keys=["state"], max_episode_steps=steps),
        MetaWorldExpert(TASK),
    )
    obs, _ = env.reset(seed=SEED)
    actions = []
    for _ in range(steps):
        actions.append(expert(obs))
        obs, _, terminated, _, _ = env.step(actions[-1])
        if terminated:
            break
    env.close()
    return np.stack(actions)


def counting_env(max_steps: int, lazy: bool, n_obs_steps: int) -> tuple[MultiStepWrapper, list[int]]:
    env = make_env(TASK, max_episode_steps=max_steps)
    calls, cloud = [], env.point_cloud

    def counted() -> np.ndarray:
        calls.append(1)
        return cloud()

    env.point_cloud = counted
    return MultiStepWrapper(env, n_obs_steps, lazy=lazy), calls


@pytest.mark.parametrize(
    "source, n_obs_steps, n_action_steps",
    [("expert", 2, 3), ("random", 2, 3), ("random", 2, 5), ("random", 3, 2)],
)
def test_lazy_observations_equal_eager_ones(source, n_obs_steps, n_action_steps):
    """Same seed, same action chunks: every observation a policy receives is bit-identical."""
    max_steps = 100 if source == "expert" else 20  # random: truncated mid-chunk (20 % 3 != 0)
    actions = (
        expert_actions(max_steps) if source == "expert" else np.random.default_rng(0).uniform(-1, 1, (20, 4))
    )
    (eager, eager_calls), (lazy, lazy_calls) = (
        counting_env(max_steps, z, n_obs_steps) for z in (False, True)
    )
    obs_e, _ = eager.reset(seed=SEED)
    obs_l, _ = lazy.reset(seed=SEED)
    t, done = 0, False
    while not done:
        assert obs_e.keys() == obs_l.keys() and all(np.array_equal(obs_e[k], obs_l[k]) for k in obs_e)
        chunk = actions[t : t + n_action_steps]
        obs_e, r_e, term_e, trunc_e, info_e = eager.step(chunk)
        obs_l, r_l, term_l, trunc_l, info_l = lazy.step(chunk)
        assert (r_e, term_e, trunc_e, info_e["steps"], info_e["success"]) == (
            r_l,
            term_l,
            trunc_l,
            info_l["steps"],
            info_l["success"],
        )
        t += info_e["steps"]
        done = term_e or trunc_e
    assert obs_l == {} and obs_e["point_cloud"].shape[0] == n_obs_steps  # the final one is not computed
    assert (term_e, trunc_e) == ((True, False) if source == "expert" else (False, True))
    assert len(eager_calls) == t + 1
    skipped = max(0, n_action_steps - n_obs_steps) * (t // n_action_steps)  # at least, in full chunks
    assert len(eager_calls) - len(lazy_calls) >= skipped and (skipped > 0) == (n_action_steps > n_obs_steps)
    eager.close()
    lazy.close()


def test_env_computes_only_the_keys_asked_for():
    full = make_env(TASK, max_episode_steps=5)
    low = make_env(TASK, max_episode_steps=5, keys=["agent_pos", "state"])
    low.point_cloud = None  # never called
    assert list(low.observation_space.spaces) == ["agent_pos", "state"] and list(low.obs_kinds) == [
        "agent_pos",
        "state",
    ]
    a, _ = full.reset(seed=1)
    b, _ = low.reset(seed=1)
    for action in np.random.default_rng(1).uniform(-1, 1, (3, 4)):
        assert b.keys() == {"agent_pos", "state"} and all(np.array_equal(a[k], b[k]) for k in b)
        a, *_ = full.step(action)
        b, *_ = low.step(action)
    with pytest.raises(ValueError, match="unknown observation keys \\['pixels'\\]"):
        make_env(TASK, keys=["pixels"])
    full.close()
    low.close()
