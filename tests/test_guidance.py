"""Classifier-free guidance: the guidance arithmetic, one batched call or two, and a block cache per branch."""

import torch

from rtdiff.runtime.accel import UniformCache
from rtdiff.runtime.guidance import ClassifierFreeGuidance
from rtdiff.runtime.sampling import sample


def setting(policy, seed=0):
    generator = torch.Generator().manual_seed(seed)
    c = policy.config
    x = torch.randn(2, c.horizon, c.action_dim, generator=generator)
    obs = torch.rand(2, c.n_obs_steps, c.obs_dim, generator=generator) * 2 - 1
    return x, {"obs": obs}, {"obs": torch.zeros(1, c.n_obs_steps, c.obs_dim)}


def test_guidance_interpolates_and_extrapolates_between_the_branches(policy):
    x, cond, uncond = setting(policy)
    t = torch.tensor([40, 40])
    c = policy.denoiser(x, t, **cond)
    u = policy.denoiser(x, t, obs=uncond["obs"].expand_as(cond["obs"]))
    for scale in (0.0, 1.0, 3.5):
        for batched in (True, False):
            guided = ClassifierFreeGuidance(policy.denoiser, scale, uncond, batched=batched)(x, t, **cond)
            torch.testing.assert_close(guided, u + scale * (c - u), rtol=1e-5, atol=1e-5)


def test_each_branch_keeps_its_own_block_cache(policy):
    x, cond, uncond = setting(policy, seed=1)
    solver = policy.make_solver("ddim", 10)
    runs = {batched: sample(ClassifierFreeGuidance(policy.denoiser, 2.0, uncond, batched=batched), solver, x, cond,
                            accelerator=UniformCache(interval=3))
            for batched in (True, False)}
    # in one batched call the branches' cached block outputs sit in separate rows; in two calls each branch has
    # its own cache. Both are the same computation up to float rounding.
    torch.testing.assert_close(runs[False], runs[True], rtol=1e-4, atol=1e-4)
    uncached = sample(ClassifierFreeGuidance(policy.denoiser, 2.0, uncond), solver, x, cond)
    assert (runs[False] - uncached).abs().max() > 1e-4  # the cache did stand in for some blocks
