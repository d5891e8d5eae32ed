#!/usr/bin/env python3
"""The real-guest rows of docs/performance.md, from qemu-configs' guest in one boot.

A ``vhost-rpmsg serve`` (an rpmsg-raw echo at 1024, a sink at 1026) and one boot of
``run-guest.sh`` whose user space runs, from /dev/rpmsgN:

* ``rpmsg-chan echo N``: N byte-checked round trips of 0..496 bytes;
* ``rpmsg-ept … tput M 496``: M messages of 496 bytes into the sink, as fast as the
  guest writes them;
* ``rpmsg-chan lat K 16``: K ping-pongs of 16 bytes, p50 / p99 measured in the guest.

Each workload sits between two marks the guest prints on its serial console.  The
console is read as it streams, and the server's CPU time (the kernel's CPU clock of
the process, all its threads) is read the moment a mark is seen, so every figure
is the backend's CPU over that workload alone, not over the boot.

    python qemu-configs/real-guest-bench.py [--engine cffi] [--echoes 20000]
        [--flood 200000] [--lat 5000] [--patched] [--json out.json]

Needs the guest built by provision.sh (the suite's cache).  Prints a table and the
guest's own lines (LAT, TPUT, ECHO-OK); exits non-zero if the guest or a workload fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARK = re.compile(r"VRB-MARK (\w+)")  # anywhere in a line: a kernel message may share it
#: the stock guest's known interrupt-context crash (docs/qemu.md): booted once more
OOPS = re.compile(r"BUG: scheduling while atomic|Oops: |Kernel panic")


def cpu_seconds(pid: int) -> float:
    """CPU time so far of every thread of ``pid``, from the kernel's per-process CPU
    clock (clock_getcpuclockid: ~pid << 3 | CPUCLOCK_SCHED), in nanoseconds, not the
    10 ms ticks of /proc/PID/stat: a small run's workload can take less than a tick."""
    return time.clock_gettime((~pid << 3) | 2)


def start_server(sock: str, engine: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vhost_rpmsg.cli", "serve", "--socket-path", sock,
             "--engine", engine, "--endpoint", "rpmsg-raw:echo@1024",
             "--endpoint", "sink@1026", "--log-level", "warning"], stderr=err)
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"error: the server did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return proc


def script(echoes: int, flood: int, lat: int) -> str:
    """The guest's commands, each workload between two marks."""
    def marked(name: str, cmd: str) -> str:
        return f"echo VRB-MARK {name}0; {cmd}; echo VRB-MARK {name}1"

    return "; ".join([marked("echo", f"rpmsg-chan echo {echoes}"),
                      marked("flood", f"rpmsg-ept flood any 1026 tput {flood} 496"),
                      marked("lat", f"rpmsg-chan lat {lat} 16")])


def boot(sock: str, server: subprocess.Popen[bytes], cmd: str, patched: bool,
         timeout: int) -> tuple[int, str, dict[str, tuple[float, float]]]:
    """Boot once; (exit status, console, mark name -> (wall time, server CPU) seen)."""
    args = ["bash", str(HERE / "run-guest.sh"), "--socket", sock, "--timeout", str(timeout),
            "--append-cmd", cmd, *(["--patched"] if patched else [])]
    marks: dict[str, tuple[float, float]] = {}
    lines: list[str] = []
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    assert proc.stdout is not None
    try:
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            m = MARK.search(line)
            if m and server.poll() is None:  # a dead server: its log says why, below
                marks.setdefault(m[1], (time.monotonic(), cpu_seconds(server.pid)))
            lines.append(line)
        rc = proc.wait(timeout + 60)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return rc, "".join(lines), marks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", default="cffi")
    ap.add_argument("--echoes", type=int, default=20000)
    ap.add_argument("--flood", type=int, default=200000)
    ap.add_argument("--lat", type=int, default=5000)
    ap.add_argument("--patched", action="store_true", help="boot the patched guest")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vr-real-bench-") as tmp:
        sock = os.path.join(tmp, "rpmsg.sock")
        log = Path(tmp) / "server.log"
        server = start_server(sock, a.engine, log)
        try:
            for attempt in (1, 2):
                rc, out, marks = boot(sock, server, script(a.echoes, a.flood, a.lat),
                                      a.patched, a.timeout)
                oops = OOPS.search(out)
                if rc == 0 or not oops or attempt == 2:
                    break
                print(f"warning: the guest kernel crashed ({out[oops.start():].splitlines()[0]!r}"
                      "), the known virtio_rpmsg_bus interrupt-context bug; booting once more",
                      file=sys.stderr)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if rc != 0 or len(marks) != 6:
            print(out, file=sys.stderr)
            print(f"--- server ---\n{log.read_text()}", file=sys.stderr)
            print(f"error: guest exited {rc} with marks {sorted(marks)}", file=sys.stderr)
            return 1

    def span(name: str) -> tuple[float, float]:
        (w0, c0), (w1, c1) = marks[f"{name}0"], marks[f"{name}1"]
        return w1 - w0, c1 - c0

    ok = re.search(r"ECHO-OK (\d+)", out)
    tput = re.search(r"TPUT n=(\d+) size=496 .*tx_rate=(\d+) msgs/s", out)
    lat = re.search(r"LAT n=\d+ size=\d+ .*p50=([\d.]+)us p99=([\d.]+)us", out)
    if not (ok and int(ok[1]) == a.echoes and tput and lat):
        print(out, file=sys.stderr)
        print("error: a workload did not report what it should", file=sys.stderr)
        return 1
    (ew, ec), (fw, fc), (_, lc) = span("echo"), span("flood"), span("lat")
    figures = {
        "engine": a.engine, "guest": "patched" if a.patched else "stock",
        "echo_round_trips": a.echoes, "echo_seconds": ew,
        "backend_cpu_per_echo_us": ec / a.echoes * 1e6,
        "flood_messages": a.flood, "flood_guest_msgs_per_s": int(tput[2]),
        "backend_cpu_per_flood_msg_us": fc / a.flood * 1e6, "flood_backend_share": fc / fw,
        "lat_p50_us": float(lat[1]), "lat_p99_us": float(lat[2]),
        "backend_cpu_per_lat_round_trip_us": lc / a.lat * 1e6,
    }
    print(ok[0], tput[0], lat[0], sep="\n")
    print(f"{'figure':38} value\n{'-' * 38} ------")
    for k, v in figures.items():
        print(f"{k:38} {v:,.1f}" if isinstance(v, float) else f"{k:38} {v}")
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
