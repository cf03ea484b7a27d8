"""Prompts to the text embedding MusicLDM's UNet is conditioned on: CLAP's text tower, projected and L2-normalised.

Computed from the text tower's parts (`text_model`, `text_projection`) rather
than `get_text_features`, whose return type changed in transformers 5 (an
output object instead of the normalised tensor), so one code path serves both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def embed_text(text_encoder, tokenizer, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
    """(len(prompts), projection_dim) unit vectors. Each prompt is padded (and cut) to `max_length` tokens, by
    default the tokenizer's `model_max_length`."""
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    output = text_encoder.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    return F.normalize(text_encoder.text_projection(output.pooler_output), dim=-1)


def embed_prompts(text_encoder, tokenizer, prompts: list[str],
                  negative_prompts: list[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional, unconditional) embeddings, as MusicLDM's diffusers pipeline computes them: the negative
    prompt (or the empty prompt) is padded to as many tokens as the embedding has dimensions, which is that
    pipeline's rule; with the attention mask the padding length changes nothing but where a long negative
    prompt is cut."""
    conditional = embed_text(text_encoder, tokenizer, prompts)
    negative = negative_prompts if negative_prompts is not None else [""] * len(prompts)
    if len(negative) != len(prompts):
        raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
    unconditional = embed_text(text_encoder, tokenizer, negative, max_length=conditional.shape[1])
    return conditional, unconditional
