"""A short run of each fuzz target (fuzz/README.md), so that CI sees a crash they find.

Each target runs in a subprocess, as atheris needs, from its committed seed corpus for a
few thousand inputs or a few seconds, whichever comes first; a crash (the target's own
assertion, an exception no clean refusal explains, a sanitizer report) fails the test
with libFuzzer's output.  The saved reproducers of findings not yet fixed are replayed
too: their targets tolerate them (fuzz/README.md, "Findings"), so they must pass.

Without atheris the test fails, unless VHOST_RPMSG_ALLOW_NO_ATHERIS=1 lets it skip.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
#: inputs per target, and the time cap of each run (seconds)
RUNS = {"rings": 3000, "rpmsg": 3000, "vhost_user": 1000}
SECONDS = 2
ALLOW_ENV = "VHOST_RPMSG_ALLOW_NO_ATHERIS"


def require_atheris() -> None:
    if importlib.util.find_spec("atheris") is not None:
        return
    reason = (f"atheris is not installed in {sys.executable} (pip install atheris); "
              f"set {ALLOW_ENV}=1 to skip the fuzz smoke run instead")
    if os.environ.get(ALLOW_ENV) == "1":
        pytest.skip(reason)
    pytest.fail(reason)


def run_target(target: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VHOST_RPMSG_FUZZ_ASAN", "VHOST_RPMSG_FUZZ_STRICT", "LD_PRELOAD")}
    return subprocess.run([sys.executable, str(FUZZ / f"fuzz_{target}.py"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, errors="replace",
                          timeout=120)


def show(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines()
             if not ln.startswith("INFO: Instrumenting")]
    return "\n".join(lines[-150:])


@pytest.mark.parametrize("target", list(RUNS))
def test_fuzz_target_smoke(target: str, tmp_path: Path) -> None:
    require_atheris()
    corpus = tmp_path / "corpus"  # new inputs land here, never in fuzz/corpus
    corpus.mkdir()
    seeds = FUZZ / "corpus" / target
    assert any(seeds.iterdir()), f"no seed corpus in {seeds}"
    proc = run_target(target, [str(corpus), str(seeds), f"-runs={RUNS[target]}",
                               f"-max_total_time={SECONDS}", "-timeout=30",
                               f"-artifact_prefix={tmp_path}/"], tmp_path)
    assert proc.returncode == 0, f"fuzz_{target} found a crash:\n{show(proc)}"
    out = proc.stdout + proc.stderr
    done = re.search(r"^Done (\d+) runs", out, re.M)
    assert done and int(done.group(1)) > 0, f"fuzz_{target} ran no input:\n{show(proc)}"
    cov = re.findall(r" cov: (\d+) ", out)
    assert cov and int(cov[-1]) > 0, f"fuzz_{target} reports no coverage:\n{show(proc)}"


@pytest.mark.parametrize("target", [t for t in RUNS
                                    if any((FUZZ / "crashes").glob(f"{t}-*"))])
def test_saved_reproducers_pass(target: str, tmp_path: Path) -> None:
    """Every finding saved in fuzz/crashes/ replays clean: fixed, or (slow inputs)
    within the run's timeout."""
    require_atheris()
    saved = sorted((FUZZ / "crashes").glob(f"{target}-*"))
    proc = run_target(target, [str(p) for p in saved], tmp_path)
    assert proc.returncode == 0, f"a saved fuzz_{target} reproducer fails:\n{show(proc)}"
