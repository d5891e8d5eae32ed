"""What a hung guest's vCPUs are doing, read from QEMU's human monitor.

A guest that stops answering looks the same from the host whether the back-end lost a
notification or the guest deadlocked; the vCPUs' instruction pointers tell them apart.
The stock guest's known hang (docs/qemu.md, "Diagnosis from a debug kernel") leaves a
vCPU spinning in ``mutex_spin_on_owner`` with interrupts off, so the suite names that
case instead of printing a bare timeout.
"""

from __future__ import annotations

import bisect
import re
import socket
import time
from pathlib import Path

#: the one symbol the known guest-side deadlock spins in
GUEST_DEADLOCK_SYMBOL = "mutex_spin_on_owner"


class KernelSymbols:
    """Text symbols of the guest kernel's System.map, for naming an address."""

    def __init__(self, system_map: Path) -> None:
        pairs = []
        for line in system_map.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[1] in ("t", "T", "w", "W"):
                pairs.append((int(fields[0], 16), fields[2]))
        pairs.sort()
        self._addrs = [a for a, _ in pairs]
        self._names = [n for _, n in pairs]

    def name(self, addr: int) -> str:
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0 or addr - self._addrs[i] > 0x100000:  # a module, or not kernel text
            return hex(addr)
        return f"{self._names[i]}+{addr - self._addrs[i]:#x}"


def _command(path: str, line: str, wait: float = 0.5) -> str:
    """One monitor command on a fresh connection, its output until the line goes quiet."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(wait)
        s.connect(path)
        s.sendall(line.encode() + b"\n")
        chunks = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                data = s.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks).decode(errors="replace")


def vcpu_sites(monitor: str, symbols: KernelSymbols, samples: int = 3) -> list[list[str]]:
    """``samples`` readings of every vCPU's RIP, by symbol; [] if the monitor is gone."""
    seen = []
    for _ in range(samples):
        try:
            regs = _command(monitor, "info registers -a")
        except OSError:
            return []
        seen.append([symbols.name(int(x, 16)) for x in re.findall(r"RIP=([0-9a-f]+)", regs)])
        time.sleep(0.2)
    return seen


def diagnose(sites: list[list[str]]) -> str:
    """One line saying what the samples show."""
    if not sites or not any(sites):
        return "vCPU state unknown (the QEMU monitor did not answer)"
    stuck = [cpu for cpu in range(len(sites[0]))
             if all(cpu < len(s) and s[cpu].startswith(GUEST_DEADLOCK_SYMBOL + "+") for s in sites)]
    where = "; ".join(f"vCPU{cpu}: {', '.join(sorted({s[cpu] for s in sites if cpu < len(s)}))}"
                      for cpu in range(len(sites[0])))
    if stuck:
        return (f"guest-side deadlock: vCPU{stuck[0]} spins in {GUEST_DEADLOCK_SYMBOL} in "
                "every sample, the stock virtio_rpmsg_bus interrupt-context hang "
                f"(docs/qemu.md) [{where}]")
    return f"guest still running [{where}]"
