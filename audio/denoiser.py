"""MusicLDM's UNet as an rtdiff denoiser: `denoiser(x, t, text=embedding)`.

The CLAP text embedding enters the UNet as `class_labels` (its class embedding
is a projection concatenated to the time embedding); there is no cross-attention
context, so `encoder_hidden_states` is None and the transformer blocks attend
over the latent's own positions.
"""

from __future__ import annotations

import torch
from torch import nn


class MusicUNetDenoiser(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=None, class_labels=text, return_dict=False)[0]
