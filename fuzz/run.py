#!/usr/bin/env python3
"""Run one fuzz target for a number of inputs or a time, nice'd, and summarise it.

libFuzzer stops at the first crash; this driver saves the crashing input under the
output directory, restarts the target with the inputs and time left (the corpus grown
so far kept), and at the end prints one line: inputs executed, wall time, the coverage
atheris reported (``cov``: Python branches and edges; ``ft``: features), corpus size,
crashes.  New corpus entries go to the output directory, never into fuzz/corpus.

    python fuzz/run.py rings --runs 1000000 --time 1800 --asan --out /tmp/fuzz-rings
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ("vhost_user", "rpmsg", "rings")
STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/")
DONE = re.compile(r"^Done (\d+) runs in (\d+) second")


def command(target: str, corpus: Path, artifacts: Path, runs: int, seconds: int,
            extra: list[str]) -> list[str]:
    return ["nice", "-n", "10", sys.executable, str(HERE / f"fuzz_{target}.py"),
            str(corpus), str(HERE / "corpus" / target), f"-runs={runs}",
            f"-max_total_time={seconds}", f"-artifact_prefix={artifacts}/",
            "-timeout=60", "-rss_limit_mb=4096", "-print_final_stats=1", *extra]


def environment(asan: bool) -> dict[str, str]:
    env = dict(os.environ)
    if asan:
        sys.path.insert(0, str(HERE))
        import build_asan

        if not (build_asan.OUT / "libcovshim.so").exists():
            raise SystemExit("no ASan build: run `python fuzz/build_asan.py` first")
        env.update(build_asan.env())
    return env


def run(target: str, runs: int, seconds: int, asan: bool, out: Path,
        extra: list[str]) -> dict[str, object]:
    corpus, artifacts = out / "corpus", out / "crashes"
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    env = environment(asan)
    log = (out / "log.txt").open("a")
    start = time.monotonic()
    done = 0
    crashes = 0
    cov = ft = corp = 0
    while done < runs:
        left = int(seconds - (time.monotonic() - start))
        if left <= 0:
            break
        argv = command(target, corpus, artifacts, runs - done, left, extra)
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        assert proc.stdout is not None
        last = 0
        for line in proc.stdout:
            log.write(line)
            m = STATUS.match(line)
            if m:
                last = int(m.group(1))
                cov, ft, corp = int(m.group(2)), int(m.group(3)), int(m.group(4))
            d = DONE.match(line)
            if d:
                last = int(d.group(1))
        code = proc.wait()
        log.flush()
        done += max(last, 1)
        if code != 0:
            crashes += 1
            log.write(f"[run.py] exit {code}: crash #{crashes}, restarting\n")
            if crashes >= 20:
                break
    result = {"target": target, "asan": asan, "inputs": done,
              "seconds": round(time.monotonic() - start), "cov": cov, "ft": ft,
              "corpus": corp, "crashes": crashes, "artifacts": str(artifacts)}
    log.write(f"[run.py] {result}\n")
    log.close()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", choices=TARGETS)
    p.add_argument("--runs", type=int, default=1_000_000)
    p.add_argument("--time", type=int, default=1800, help="seconds of wall time at most")
    p.add_argument("--asan", action="store_true", help="with the ASan build (build_asan.py)")
    p.add_argument("--out", type=Path, help="corpus, crashes and log (default /tmp/...)")
    p.add_argument("--fresh", action="store_true", help="empty --out first")
    p.add_argument("extra", nargs="*", help="more libFuzzer flags (after --)")
    a = p.parse_args()
    out = a.out or Path("/tmp") / f"vhost-rpmsg-fuzz-{a.target}"
    if a.fresh and out.exists():
        shutil.rmtree(out)
    print(run(a.target, a.runs, a.time, a.asan, out, a.extra))


if __name__ == "__main__":
    main()
