"""The policy modality as the core sees it: its checkpoint formats, bundled checkpoints and subcommands.

Registered in pyproject.toml under the `rtdiff.modalities` entry-point group.
"""

from rtdiff.policies.checkpoint import BUNDLED, LEROBOT_POLICY, RTDIFF_POLICY
from rtdiff.runtime.registry import Modality


def _add_commands(commands) -> None:
    from rtdiff.policies.cli import add_commands

    add_commands(commands)


def _add_demos(targets) -> None:
    from rtdiff.policies.cli import add_demos

    add_demos(targets)


MODALITY = Modality("policy", [RTDIFF_POLICY, LEROBOT_POLICY], bundled=BUNDLED, add_commands=_add_commands,
                    add_demos=_add_demos)
