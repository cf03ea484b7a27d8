"""The audio modality as the core sees it: MusicLDM folders (diffusers' layout), the bundled models, `rtdiff audio`.

Registered in pyproject.toml under the `rtdiff.modalities` entry-point group.
"""

from pathlib import Path

from rtdiff.audio.components import is_musicldm_folder, load_musicldm, weight_files
from rtdiff.runtime.checkpoints import CheckpointFormat
from rtdiff.runtime.registry import Modality

BUNDLED = Path(__file__).resolve().parent / "checkpoints"



def _serve(folder, run):
    from rtdiff.audio.service import MusicService

    return MusicService(folder, run)


MUSICLDM = CheckpointFormat("diffusers-musicldm", "audio", is_musicldm_folder, load_musicldm, weights=weight_files,
                            service=_serve)


def _add_commands(commands) -> None:
    from rtdiff.audio.cli import add_commands

    add_commands(commands)


def _add_demos(targets) -> None:
    from rtdiff.audio.cli import add_demos

    add_demos(targets)


MODALITY = Modality("audio", [MUSICLDM], bundled=BUNDLED, add_commands=_add_commands, add_demos=_add_demos)
