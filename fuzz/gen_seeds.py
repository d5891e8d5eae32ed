"""Write the hand-made seed corpora: fuzz/corpus/<target>/<name> from each target's seeds().

The seeds are encoded with the same Reader/Writer format the targets read, so they
start the fuzzer past the handshake or ring setup it would take long to find alone.
Rerun after changing a target's input format (the old seeds would then mean something
else); files the fuzzer added to a corpus directory are left alone.

    python fuzz/gen_seeds.py
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ("vhost_user", "rpmsg", "rings")


def main() -> None:
    sys.path.insert(0, str(HERE))
    for name in TARGETS:
        mod = importlib.import_module(f"fuzz_{name}")
        out = HERE / "corpus" / name
        out.mkdir(parents=True, exist_ok=True)
        seeds: dict[str, bytes] = mod.seeds()
        for seed, data in seeds.items():
            (out / f"seed-{seed}").write_bytes(data)
        print(f"{out}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
