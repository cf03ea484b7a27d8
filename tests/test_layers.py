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


CORE_CHECK = """
import importlib, pkgutil, sys
import rtdiff.runtime, rtdiff.export
modality = ("rtdiff.policies", "rtdiff.sims", "rtdiff.audio", "rtdiff.video")
names = [m.name for package in (rtdiff.runtime, rtdiff.export)
         for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in sorted(names):  # tensorrt_backend and cudagraph too: they reach TensorRT and CUDA only when used
    importlib.import_module(name)
    loaded = sorted(m for m in sys.modules if m.startswith(modality))
    if loaded:
        print(f"{name} loaded {loaded}")
        sys.exit(1)
print(len(names))
"""


def test_the_core_imports_no_modality_and_no_sim(tmp_path):
    result = _python(CORE_CHECK, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert int(result.stdout.split()[-1]) >= 20  # every module of runtime/ and export/ was imported


MODALITY_CHECK = """
import importlib, pkgutil, sys
import {package}
names = [m.name for m in pkgutil.walk_packages({package}.__path__, "{package}.")]
for name in sorted(names):
    importlib.import_module(name)
    loaded = sorted(m for m in sys.modules if m.startswith({others}))
    if loaded:
        print(f"{{name}} loaded {{loaded}}")
        sys.exit(1)
print(len(names))
"""


def test_a_modality_imports_no_other_modality(tmp_path):
    for package, others in (("rtdiff.audio", ("rtdiff.policies", "rtdiff.sims", "rtdiff.video")),
                            ("rtdiff.policies", ("rtdiff.audio", "rtdiff.video"))):
        result = _python(MODALITY_CHECK.format(package=package, others=others), tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert int(result.stdout.split()[-1]) >= 8, package
