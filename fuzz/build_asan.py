#!/usr/bin/env python3
"""Build AddressSanitizer copies of the C extensions into fuzz/build-asan/.

The ring engine (``_vhost_rpmsg_vring``, cext/build_vring.py) and the rpmsg header check
(``_vhost_rpmsg_headers``, cext/build_rpmsg.py) are built from the project's own build
scripts, unchanged: the sanitizer flags come in through CFLAGS and LDFLAGS, which the
compiler setup distutils does for cffi appends to every compile and link, and the
output goes to a directory of its own, so the regular build is never touched.  A target
imports these copies when VHOST_RPMSG_FUZZ_ASAN=1 (fuzz/_common.py checks it got them).

    python fuzz/build_asan.py
    VHOST_RPMSG_FUZZ_ASAN=1 PYTHONMALLOC=malloc \\
        ASAN_OPTIONS=detect_leaks=0:verify_asan_link_order=0 \\
        LD_PRELOAD=$PWD/fuzz/build-asan/libcovshim.so:$(gcc -print-file-name=libasan.so) \\
        python fuzz/fuzz_rings.py /tmp/corpus-rings fuzz/corpus/rings -runs=100000

(fuzz/run.py --asan sets that environment.)  PYTHONMALLOC=malloc sends Python's own small
allocations (cffi's ffi.new buffers among them) through malloc, so ASan puts red zones
around them too.  Leak detection is off: the interpreter keeps memory to the end on
purpose.  libcovshim.so (fuzz/covshim.c) keeps atheris's Python coverage working next to
gcc's libasan; without it (LD_PRELOAD=libasan.so alone) the run still catches memory
errors but is not coverage guided.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "build-asan"
ASAN_FLAGS = "-fsanitize=address -fno-omit-frame-pointer -g"
MODULES = ("build_vring", "build_rpmsg")


def build() -> list[Path]:
    """Build every module of MODULES with ASan into OUT; the paths built."""
    sys.path.insert(0, str(ROOT / "cext"))
    OUT.mkdir(exist_ok=True)
    (OUT / ".gitignore").write_text("*\n")  # build output: never committed
    tmp = OUT / "tmp"
    saved = {k: os.environ.get(k) for k in ("CFLAGS", "LDFLAGS")}
    os.environ["CFLAGS"] = f"{saved['CFLAGS'] or ''} {ASAN_FLAGS}".strip()
    os.environ["LDFLAGS"] = f"{saved['LDFLAGS'] or ''} -fsanitize=address".strip()
    built = []
    try:
        for name in MODULES:
            script = __import__(name)
            ffi = script.make_ffi(absolute=True)
            so = Path(ffi.compile(tmpdir=str(tmp / name), verbose=False))
            for old in OUT.glob(f"{script.MODULE}*.so"):
                old.unlink()
            dest = OUT / so.name
            shutil.copy2(so, dest)
            built.append(dest)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return built


def atheris_core() -> Path:
    """atheris's module with libFuzzer linked in (what the shim forwards to)."""
    spec = importlib.util.find_spec("atheris")
    if spec is None or spec.origin is None:
        raise SystemExit("atheris is not installed: pip install atheris")
    cores = sorted(Path(spec.origin).parent.glob("core_with_libfuzzer*.so"))
    if not cores:
        raise SystemExit(f"no core_with_libfuzzer*.so beside {spec.origin}")
    return cores[0]


def build_shim() -> Path:
    """fuzz/covshim.c against this venv's atheris (see that file for why)."""
    out = OUT / "libcovshim.so"
    define = f'-DATHERIS_CORE="{atheris_core()}"'
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", define, "-o", str(out),
                    str(HERE / "covshim.c"), "-ldl"], check=True)
    return out


def env() -> dict[str, str]:
    """The environment of an ASan fuzz run (what fuzz/README.md spells out)."""
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], check=True,
                             capture_output=True, text=True).stdout.strip()
    return {
        "VHOST_RPMSG_FUZZ_ASAN": "1",
        "LD_PRELOAD": f"{OUT / 'libcovshim.so'}:{libasan}",
        "ASAN_OPTIONS": "detect_leaks=0:verify_asan_link_order=0",
        "PYTHONMALLOC": "malloc",
    }


def main() -> None:
    for path in [*build(), build_shim()]:
        print(path)
    print("run with: " + " ".join(f"{k}={v}" for k, v in env().items()))


if __name__ == "__main__":
    main()
