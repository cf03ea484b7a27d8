"""MusicLDM's UNet as an rtdiff denoiser: `denoiser(x, t, text=embedding)`, and what accelerators may cache in it.

The CLAP text embedding enters the UNet as `class_labels` (its class embedding
is a projection concatenated to the time embedding); there is no cross-attention
context, so `encoder_hidden_states` is None and the transformer blocks attend
over the latent's own positions.

Cacheable blocks (`cache_blocks`), DeepCache's split: the resolution stages
below the outermost (down stages 1.., the mid stage, up stages ..-2) and, inside
the attention stages, each transformer block's branches: self-attention
(`attn1`), the second attention (`attn2`, also over the latent since there is
no context) and the feed-forward (`ff`). The outermost down and up stages always
run, so a step that reuses every deeper output still recomputes the shallow
path from the current sample, as DeepCache does. Token-wise (SADA's partial
calls): the feed-forward branches, whose output at a cell depends only on that
cell; the token grid is the latent's time x frequency cells (`token_layout`),
and a coarser stage's cells are the ones covering the named latent cells.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rtdiff.runtime.accel.hooks import CacheBlock


class MusicUNetDenoiser(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=None, class_labels=text, return_dict=False)[0]

    def _stages(self) -> list[tuple[str, nn.Module]]:
        unet = self.unet
        return ([(f"unet.down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks) if i > 0]
                + [("unet.mid_block", unet.mid_block)]
                + [(f"unet.up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks) if i < len(unet.up_blocks) - 1])

    def cache_blocks(self) -> list[CacheBlock]:
        blocks = []
        for stage_name, stage in self._stages():
            blocks.append(CacheBlock(stage_name, stage, "resolution_stage"))
            for name, module in stage.named_modules():
                if type(module).__name__ == "BasicTransformerBlock":
                    prefix = f"{stage_name}.{name}"
                    blocks += [CacheBlock(f"{prefix}.attn1", module.attn1, "attention"),
                               CacheBlock(f"{prefix}.attn2", module.attn2, "attention"),
                               CacheBlock(f"{prefix}.ff", module.ff, "feed_forward")]
        return blocks

    def tokenwise_blocks(self) -> list[tuple[str, object]]:
        return [(block.name, select_cells) for block in self.cache_blocks() if block.name.endswith(".ff")]

    @staticmethod
    def token_layout(x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, F) -> (B, T, F, C): the latent's cells as SADA's tokens."""
        return x.permute(0, 2, 3, 1)


def select_cells(args: tuple, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[tuple, torch.Tensor]:
    """A feed-forward branch's input cut to the cells covering the named latent cells. The branch sees its stage's
    grid, the latent's downsampled by some k in both directions, flattened: (B, ceil(T/k) * ceil(F/k), C). A
    stride-2 downsampler rounds an odd side up (a 10 s latent's 250 frames become 125, then 63), so the last
    stage cell of such a side covers fewer latent cells."""
    (hidden,) = args
    time_cells, freq_cells = grid
    k = _downsampling(grid, hidden.shape[1])
    named = torch.zeros(time_cells * freq_cells, dtype=torch.float32)
    named[tokens] = 1.0
    covering = F.max_pool2d(named.view(1, 1, time_cells, freq_cells), k, ceil_mode=True)[0, 0].flatten()
    positions = torch.nonzero(covering).flatten()
    return (hidden[:, positions],), positions


def _downsampling(grid: tuple[int, int], cells: int) -> int:
    k = 1
    while k <= max(grid):
        if math.ceil(grid[0] / k) * math.ceil(grid[1] / k) == cells:
            return k
        k *= 2
    raise ValueError(f"a {cells}-cell stage is not the {grid} latent grid downsampled by a power of two")
