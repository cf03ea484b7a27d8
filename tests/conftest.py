"""Tiny untrained policies shared by the tests: fast to build, small enough to run anywhere."""

import threading

import pytest
import torch

from rtdiff.policies.checkpoint import save_policy
from rtdiff.policies.config import PolicyConfig
from rtdiff.policies.modeling import DiffusionPolicy

TINY = {
    "unet": dict(arch="unet", down_dims=(8, 16), n_groups=4, diffusion_step_embed_dim=8, horizon=8, n_action_steps=4),
    "transformer": dict(arch="transformer", n_layer=2, n_head=2, n_emb=16, horizon=6, n_action_steps=4, adaln=True),
}


def make_tiny_policy(arch: str) -> DiffusionPolicy:
    torch.manual_seed(0)
    policy = DiffusionPolicy(PolicyConfig(**TINY[arch])).eval()
    with torch.no_grad():  # open what initialises at zero (adaLN-Zero gates, the head), as training would
        for parameter in policy.denoiser.parameters():
            if not parameter.any():
                parameter.normal_(std=0.1)
    return policy


@pytest.fixture
def make_tiny():
    """The builder itself, for tests that pick the architecture."""
    return make_tiny_policy


@pytest.fixture(params=sorted(TINY))
def policy(request):
    return make_tiny_policy(request.param)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny UNet checkpoint on disk, normalisers fitted to PushT-like ranges (a server loads it by path)."""
    policy = make_tiny_policy("unet")
    policy.obs_normalizer.fit(torch.rand(100, 2, 5) * 500)
    policy.action_normalizer.fit(torch.rand(100, 8, 2) * 500)
    return save_policy(policy, tmp_path_factory.mktemp("tiny") / "policy")


class ServerThread:
    """A server for `services` on a thread, on a free loopback port; stopped and joined on exit."""

    def __init__(self, services: dict, **config):
        from rtdiff.runtime.server import Server, ServerConfig

        self.server = Server(services, ServerConfig(bind="tcp://127.0.0.1:0", **config))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self.server

    def __exit__(self, *exc):
        self.server.stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()
