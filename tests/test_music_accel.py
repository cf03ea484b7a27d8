"""Accelerators on MusicLDM's UNet: which blocks cache, token-wise feed-forwards on a non-square latent grid
(at every stage's resolution, in the doubled guidance batch), and each accelerator running a guided trajectory."""

from __future__ import annotations

import pytest
import torch

from rtdiff.audio.components import load_musicldm
from rtdiff.audio.pipeline import TextToMusic
from rtdiff.runtime.accel import make_accelerator
from rtdiff.runtime.accel.hooks import CacheHooks
from tests.musicldm_tiny import build_tiny_musicldm


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return TextToMusic(load_musicldm(build_tiny_musicldm(tmp_path_factory.mktemp("musicldm") / "tiny")))


def test_the_outermost_stages_always_run_and_the_rest_cache(pipeline):
    names = [block.name for block in pipeline.denoiser.cache_blocks()]
    stages = [n for n in names if n.count(".") == 2 or n == "unet.mid_block"]
    assert stages == ["unet.down_blocks.1", "unet.mid_block", "unet.up_blocks.0"]  # tiny: two stages each way
    branches = [n for n in names if n not in stages]
    assert branches and all(n.rsplit(".", 1)[1] in ("attn1", "attn2", "ff") for n in branches)
    tokenwise = [name for name, _ in pipeline.denoiser.tokenwise_blocks()]
    assert tokenwise == [n for n in branches if n.endswith(".ff")]


def test_a_partial_call_recomputes_the_cells_covering_the_named_ones(pipeline):
    denoiser = pipeline.denoiser
    modules = {block.name: block.module for block in denoiser.cache_blocks()}
    tokenwise = dict(denoiser.tokenwise_blocks())
    grid = (12, 4)  # a (B, 4, 12, 4) latent: 12 time x 4 frequency cells, coarser stages 6 x 2
    x, t, text = torch.randn(4, 4, *grid), torch.full((4,), 500), torch.randn(4, 32)  # 4 rows: 2 prompts, guided
    tokens = torch.tensor([0, 7, 46])  # cells (0, 0), (1, 3), (11, 2)
    with CacheHooks(denoiser) as hooks:
        everything = set(hooks.cache.names)
        hooks.cache.set_step(everything)
        denoiser(x, t, text=text)
        stale = {name: out for name, out in hooks.cache.outputs.items() if name in tokenwise}
        inputs = {}
        handles = [modules[name].register_forward_hook(lambda m, a, o, name=name: inputs.__setitem__(name, a))
                   for name in tokenwise]
        hooks.cache.set_step(everything, tokens, grid)
        denoiser(x + 0.5 * torch.randn_like(x), t, text=text)
        partial = {name: hooks.cache.outputs[name] for name in tokenwise}
        for handle in handles:
            handle.remove()
    for name in tokenwise:
        (hidden,) = inputs[name]
        full = type(modules[name]).forward(modules[name], hidden)
        cells = hidden.shape[1]
        expected = tokens if cells == 48 else torch.tensor([0, 1, 11])  # 6 x 2: (0, 0), (0, 1), (5, 1)
        _, positions = tokenwise[name]((hidden,), tokens, grid)
        assert torch.equal(positions, expected), name
        others = [p for p in range(cells) if p not in expected.tolist()]
        torch.testing.assert_close(partial[name][:, expected], full[:, expected], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(partial[name][:, others], stale[name][:, others], rtol=0, atol=0)


@pytest.mark.parametrize("name,options", [("uniform", {"interval": 3}), ("sada", {}),
                                          ("sada", {"tokenwise": True, "threshold": -1e30, "token_threshold": 0.0})])
def test_accelerators_run_a_guided_trajectory(pipeline, name, options):
    prompts = ["a fast high melody with drums", "bright strings"]
    latents = pipeline.initial_latents(2, 0.05, torch.Generator().manual_seed(0))
    reference = pipeline.generate(prompts, 0.05, steps=12, solver="dpmpp", latents=latents)
    accelerator = make_accelerator(name, **options)
    music = pipeline.generate(prompts, 0.05, steps=12, solver="dpmpp", latents=latents, accelerator=accelerator)
    stats = accelerator.stats()
    assert torch.isfinite(music.wave).all()
    assert stats["block_evals_fraction"] < 1.0  # something was left out
    assert not torch.equal(music.latent, reference.latent)
    if name == "sada" and options.get("tokenwise"):
        assert stats["partial_steps"] > 0 and stats["model_calls"] == 12


def test_bac_with_sada_partial_calls_use_the_latent_grid(pipeline):
    from rtdiff.runtime.accel.bac import FORMAT

    names = [block.name for block in pipeline.denoiser.cache_blocks()]
    schedule = {"format": FORMAT, "steps": 12, "solver": "dpmpp", "blocks": {n: [0, 4, 8] for n in names},
                "skippable": []}
    accelerator = make_accelerator("bac+sada", schedule=schedule, solver="dpmpp", steps=12, tokenwise=True,
                                   threshold=-1e30, token_threshold=0.0)
    music = pipeline.generate(["a calm organ in major"], 0.05, steps=12, solver="dpmpp", accelerator=accelerator,
                              generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(music.wave).all() and accelerator.stats()["partial_steps"] > 0


def test_cells_of_a_stage_whose_odd_side_was_rounded_up():
    from rtdiff.audio.denoiser import select_cells

    grid = (250, 16)  # 10 s: stages of 125 x 8 and 63 x 4 cells
    tokens = torch.tensor([0, 249 * 16 + 15])  # the first and the last latent cell
    for cells, last in ((250 * 16, 249 * 16 + 15), (125 * 8, 124 * 8 + 7), (63 * 4, 62 * 4 + 3)):
        (selected,), positions = select_cells((torch.randn(2, cells, 3),), tokens, grid)
        assert positions.tolist() == [0, last] and selected.shape == (2, 2, 3)
    with pytest.raises(ValueError, match="252-cell stage is not the"):
        select_cells((torch.randn(1, 252, 3),), tokens, (251, 17))
