"""The torch-free client: a fresh virtual environment with only ./client installed gets actions from a server."""

import subprocess
import venv
from pathlib import Path

import pytest

from tests.test_serving_process import free_address, start_server

CLIENT = Path(__file__).resolve().parent.parent / "client"

SCRIPT = """
import importlib.util, sys
import numpy as np
from rtdiff_client import Client
assert importlib.util.find_spec("torch") is None, "torch is importable in the client environment"
assert importlib.util.find_spec("rtdiff") is None, "rtdiff itself is importable in the client environment"
with Client(sys.argv[1], model="tiny") as client:
    reply = client.act(np.full((2, 5), 100.0, dtype=np.float32), seed=0)
actions = reply.arrays["actions"]
assert actions.dtype == np.float32 and actions.ndim == 2 and np.isfinite(actions).all()
print("actions", actions.shape)
"""


@pytest.fixture(scope="module")
def client_python(tmp_path_factory) -> Path:
    """A new virtual environment (no system site-packages) with `pip install ./client` and nothing else."""
    env = tmp_path_factory.mktemp("client-venv")
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(CLIENT)], capture_output=True,
                             text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    return python


def test_only_the_client_installed_gets_actions_without_torch(client_python, tiny_checkpoint):
    address = free_address()
    server = start_server(tiny_checkpoint, address)
    try:
        result = subprocess.run([str(client_python), "-c", SCRIPT, address], capture_output=True, text=True,
                                timeout=120, cwd=client_python.parent)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().startswith("actions (4,")  # the tiny policy's n_action_steps
