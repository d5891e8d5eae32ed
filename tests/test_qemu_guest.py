"""End-to-end: a stock Linux guest under QEMU against a real ``vhost-rpmsg serve``.

Needs what ``qemu-configs/provision.sh`` caches (QEMU >= 10.2, a kernel with the rpmsg
virtio drivers, the initramfs and the static guest programs).  Where that cannot be
provisioned the tests skip with the reason; CI provisions first and sets
VHOST_RPMSG_REQUIRE_QEMU=1, which turns a skip into a failure.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.qemu

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("VHOST_RPMSG_CACHE", Path.home() / ".cache" / "vhost-rpmsg"))
RUN_GUEST = ROOT / "qemu-configs" / "run-guest.sh"
NEEDED = [CACHE / "bin" / "qemu-system-x86_64", CACHE / "kernel" / "vmlinux",
          CACHE / "initramfs-base.cpio"]


def _require() -> None:
    missing = [str(p) for p in NEEDED if not p.exists()]
    if missing:
        reason = (f"guest image not provisioned ({', '.join(missing)} missing): "
                  "run qemu-configs/provision.sh")
        if os.environ.get("VHOST_RPMSG_REQUIRE_QEMU") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


@dataclass
class Server:
    proc: subprocess.Popen[str]
    path: str
    log: Path

    def text(self) -> str:
        return self.log.read_text()

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A real ``vhost-rpmsg serve`` with the endpoints the guest tests talk to."""
    _require()
    path = str(tmp_path / "rpmsg.sock")
    log = tmp_path / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhost_rpmsg.cli", "serve", "--socket-path", path,
         "--endpoint", "rpmsg-raw:echo@1024",
         "--endpoint", "rpmsg-client-sample:echo@1025",
         "--endpoint", "sink@1026",
         "--log-level", "info"],
        stderr=log.open("w"), text=True)
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"server did not start:\n{log.read_text()}")
        time.sleep(0.05)
    yield Server(proc, path, log)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@dataclass
class GuestRun:
    rc: int
    out: str
    seconds: float


# Linux 7.2's virtio_rpmsg_bus runs its rx callback in hard-interrupt context on
# virtio-pci, and the name-service callback creates devices (which can sleep) from there:
# now and then the guest kernel dies with "scheduling while atomic" (about 1 boot in 90
# here; docs/protocol.md).  Such a boot is retried once, with a warning naming it.
_GUEST_OOPS = re.compile(r"BUG: scheduling while atomic|Oops: |Kernel panic")


def boot(server: Server, script: str, timeout: int = 240, mmio: bool = False) -> GuestRun:
    """Boot the guest against ``server``, run ``script`` in it, return its console."""
    for attempt in (1, 2):
        t0 = time.monotonic()
        p = subprocess.run(["bash", str(RUN_GUEST), "--socket", server.path,
                            "--timeout", str(timeout), "--append-cmd", script,
                            *(["--mmio"] if mmio else [])],
                           capture_output=True, text=True, timeout=timeout + 60)
        out = p.stdout + p.stderr
        oops = _GUEST_OOPS.search(out)
        if p.returncode != 0 and oops and attempt == 1:
            line = out[oops.start():].splitlines()[0]
            warnings.warn(f"guest kernel crashed ({line!r}), the known virtio_rpmsg_bus "
                          "interrupt-context issue; booting once more", stacklevel=2)
            continue
        break
    return GuestRun(p.returncode, out, time.monotonic() - t0)


def _ok(run: GuestRun, server: Server) -> None:
    assert run.rc == 0, f"guest exited {run.rc}\n--- console ---\n{run.out}\n" \
                        f"--- server ---\n{server.text()}"


def test_probe_gives_rpmsg_ctrl_and_announcements(server: Server) -> None:
    run = boot(server, "ls /dev/rpmsg_ctrl0 && ls /sys/bus/rpmsg/devices/")
    _ok(run, server)
    assert "VR-READY" in run.out
    # each host service announced exactly once, to a guest that was not there yet
    assert len(re.findall(r"\.rpmsg-raw\.-1\.1024", run.out)) == 1
    assert len(re.findall(r"\.rpmsg-client-sample\.-1\.1025", run.out)) == 1


def test_client_sample_driver_talks_to_host_echo(server: Server) -> None:
    run = boot(server, "modprobe rpmsg_client_sample; sleep 2; "
                       "dmesg | grep -c 'incoming msg'; dmesg | grep -c 'goodbye'")
    _ok(run, server)
    counts = [int(x) for x in re.findall(r"^(\d+)\s*$", run.out, re.M)]
    assert counts[-2:] == [100, 1], run.out  # 100 echoes, then the sample says goodbye


def test_rpmsg_raw_echo_10000_byte_for_byte(server: Server) -> None:
    run = boot(server, "rpmsg-chan echo 10000")
    _ok(run, server)
    assert re.search(r"ECHO-OK 10000", run.out), run.out


def test_guest_created_channel_is_announced_to_host(server: Server) -> None:
    run = boot(server, "rpmsg-dev create rpmsg-raw 1100 1026 && sleep 1 && "
                       "rpmsg-dev release rpmsg-raw 1100 1026 && sleep 1")
    _ok(run, server)
    log = server.text()
    assert "guest announced 'rpmsg-raw' at 1100 (create)" in log, log
    assert "guest announced 'rpmsg-raw' at 1100 (destroy)" in log, log


def test_endpoint_via_ctrl_reaches_host_echo(server: Server) -> None:
    run = boot(server, "rpmsg-ept my-ept any 1024 echo 500")
    _ok(run, server)
    assert "ECHO-OK 500" in run.out


def test_driver_rebind_reannounces(server: Server) -> None:
    script = (
        "d=$(basename $(readlink -f /sys/bus/virtio/drivers/virtio_rpmsg_bus/virtio*)); "
        "echo $d > /sys/bus/virtio/drivers/virtio_rpmsg_bus/unbind; sleep 1; "
        "ls /sys/bus/rpmsg/devices/ | grep -c rpmsg-raw || true; "
        "echo $d > /sys/bus/virtio/drivers/virtio_rpmsg_bus/bind; sleep 1; "
        "rpmsg-chan echo 200"
    )
    run = boot(server, script)
    _ok(run, server)
    assert "ECHO-OK 200" in run.out
    assert server.text().count("guest ready:") >= 2  # a second guest session, announced


def test_mmio_transport(server: Server) -> None:
    run = boot(server, "rpmsg-chan echo 1000", mmio=True)
    _ok(run, server)
    assert "ECHO-OK 1000" in run.out


def test_guest_reboot_with_server_kept(server: Server) -> None:
    first = boot(server, "rpmsg-chan echo 50")
    second = boot(server, "rpmsg-chan echo 50")
    _ok(first, server)
    _ok(second, server)
    assert "ECHO-OK 50" in second.out


def test_figures(server: Server, record_property) -> None:  # type: ignore[no-untyped-def]
    """Latency and throughput from guest user space, and the backend's CPU share."""
    cpu0, t0 = server.cpu_seconds(), time.monotonic()
    run = boot(server, "rpmsg-chan lat 5000 16; "
                       "rpmsg-ept tput16 any 1026 tput 300000 16; "
                       "rpmsg-ept tput496 any 1026 tput 100000 496")
    cpu1, t1 = server.cpu_seconds(), time.monotonic()
    _ok(run, server)
    lat = re.search(r"LAT n=\d+ size=\d+ .*p50=([\d.]+)us p99=([\d.]+)us", run.out)
    tput = re.findall(r"TPUT n=\d+ size=(\d+) .*tx_rate=(\d+) msgs/s", run.out)
    assert lat and tput, run.out
    boot_ready = re.search(r"VR-READY .*uptime=([\d.]+)", run.out)
    figures = {
        "echo_p50_us": float(lat.group(1)), "echo_p99_us": float(lat.group(2)),
        "tput": {size: int(rate) for size, rate in tput},
        "backend_cpu_share_whole_run": (cpu1 - cpu0) / (t1 - t0),
        "boot_to_ready_s": float(boot_ready.group(1)) if boot_ready else None,
        "guest_run_s": run.seconds,
    }
    record_property("figures", figures)
    print(f"\nreal-guest figures: {figures}")
