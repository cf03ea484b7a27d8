"""Classifier-free guidance as a sampling-level wrapper around any denoiser.

    guided = ClassifierFreeGuidance(denoiser, scale=2.0, uncond={"text": empty_text_embedding})
    sample(guided, solver, x, {"text": prompt_embedding, "image": reference})

The prediction is u + scale (c - u), c from the conditioning, u from the same
conditioning with the `uncond` tensors put in place of theirs (a tensor the
unconditional pass does not replace, such as a reference image, goes to both).
By default both passes run as one call on the doubled batch. With
`batched=False` they run as two calls, and the model's blocks see each pass
as a branch of its own: a block cache keeps separate outputs for the
conditional and the unconditional pass, as the batched call keeps them in
separate rows. Accelerators reach the inner model's blocks through the wrapper.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from rtdiff.runtime.accel.hooks import block_hooks, branch


class ClassifierFreeGuidance:
    def __init__(self, denoiser, scale: float, uncond: Mapping[str, torch.Tensor], batched: bool = True):
        if not uncond:
            raise ValueError("classifier-free guidance needs the unconditional value of at least one input")
        self.denoiser, self.scale, self.uncond, self.batched = denoiser, float(scale), dict(uncond), batched

    def block_cache_hooks(self):
        """Accelerators bind through the wrapper to the model's own blocks."""
        return block_hooks(self.denoiser)

    def __getattr__(self, name: str):
        # what the model declares for token-wise compute (its token-wise blocks, its token layout) shows
        # through: both passes share the sample, so a token is stable or not for both
        if name in ("tokenwise_blocks", "token_layout"):
            return getattr(self.denoiser, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _unconditional(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = set(self.uncond) - set(cond)
        if missing:
            raise ValueError(f"unconditional inputs {sorted(missing)} replace nothing in the conditioning {sorted(cond)}")
        return {name: self.uncond[name].expand_as(value) if name in self.uncond else value
                for name, value in cond.items()}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        uncond = self._unconditional(cond)
        if self.batched:
            both = {name: torch.cat([cond[name], uncond[name]]) for name in cond}
            conditional, unconditional = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        else:
            hooks = block_hooks(self.denoiser) if hasattr(self.denoiser, "cache_blocks") else None
            conditional = self.denoiser(x, t, **cond)
            with branch(hooks, "uncond"):
                unconditional = self.denoiser(x, t, **uncond)
        return unconditional + self.scale * (conditional - unconditional)
