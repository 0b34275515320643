"""Per-sample generators: a sample's actions do not depend on the other samples of its batch."""

import pytest
import torch
from difftori.base_policies import ShapeMeta, make_policy
from difftori.base_policies.base import multinomial, rand, randn
from difftori.datasets.windows import WindowDataset
from refiner_helpers import biased_data, make, train
from store_helpers import TINY_CONFIGS, write_policy_store

torch.set_num_threads(1)
SEEDS = [11, 12, 13, 14, 15]


def gens(seeds=SEEDS):
    return [torch.Generator().manual_seed(s) for s in seeds]


def one(obs, i):
    return {k: v[i : i + 1] for k, v in obs.items()}


def test_draws_per_sample_equal_batch_of_one_draws():
    for draw in (randn, rand):
        batch = draw(len(SEEDS), 3, 7, generator=gens())
        for i, g in enumerate(gens()):
            assert torch.equal(batch[i : i + 1], draw(1, 3, 7, generator=g))
        g = torch.Generator().manual_seed(3)  # one generator: the batch as one draw, as before
        assert torch.equal(
            draw(2, 5, generator=g), draw(1, 10, generator=torch.Generator().manual_seed(3))[0].view(2, 5)
        )
    probs = torch.softmax(torch.randn(len(SEEDS), 9), -1)
    idx = multinomial(probs, 6, gens())
    for i, g in enumerate(gens()):
        assert torch.equal(idx[i : i + 1], multinomial(probs[i : i + 1], 6, g))
    with pytest.raises(ValueError, match="2 generators for a batch of 5"):
        randn(5, 2, generator=gens()[:2])


@pytest.mark.parametrize("name", ["dp3", "pointnet_bc"])
def test_base_policy_sample_equals_its_batch_of_one(tmp_path, name):
    store = write_policy_store(tmp_path / "toy.zarr")
    policy = make_policy(name, TINY_CONFIGS[name], ShapeMeta.from_store(store))
    data = WindowDataset(store, policy.obs_keys, policy.horizon, policy.n_obs_steps)
    policy.fit_normalizer(data.arrays())
    obs = next(iter(torch.utils.data.DataLoader(data, batch_size=len(SEEDS), shuffle=True)))["obs"]
    batch = policy.eval().predict_action(obs, gens())
    for i, g in enumerate(gens()):
        torch.testing.assert_close(
            batch[i : i + 1], policy.predict_action(one(obs, i), g), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("difftori", {}),
        ("difftori", {"init": "random", "samples": 3}),
        ("residual", {}),
        ("ibc", {}),
        ("ibc", {"init": "uniform", "perturbed_negatives": 0, "dfo_samples": 256}),
    ],
)
def test_refiner_sample_equals_its_batch_of_one(name, overrides):
    data = biased_data(256, seed=0)
    refiner = train(make(name, data, **overrides), data, steps=30)
    obs = {"state": data["obs"]["state"][: len(SEEDS)]}
    init = data["init_action"][: len(SEEDS), 0]
    with torch.no_grad():
        batch = refiner.refine(obs, init, gens())
        for i, g in enumerate(gens()):
            alone = refiner.refine(one(obs, i), init[i : i + 1], g)
            torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-5, rtol=1e-5)
