"""The installed layout: one `rtdiff` import namespace, and a core that loads no modality."""

import subprocess
import sys


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_one_namespace_outside_the_repository(tmp_path):
    # from a folder that is not the repository, only the rtdiff names resolve
    assert _python("import rtdiff.runtime, rtdiff.export, rtdiff.policies", tmp_path).returncode == 0
    for name in ("runtime", "policies", "export", "sims", "audio", "video"):
        result = _python(f"import {name}", tmp_path)
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, name
