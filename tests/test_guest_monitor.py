"""The hung-guest diagnosis the real-guest suite prints (tests/guest_monitor.py)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from tests.guest_monitor import KernelSymbols, diagnose, vcpu_sites


def _symbols(tmp_path: Path) -> KernelSymbols:
    m = tmp_path / "System.map"
    m.write_text("ffffffff81000000 T _stext\n"
                 "ffffffff81100000 t mutex_spin_on_owner\n"
                 "ffffffff81100200 T smp_call_function_many_cond\n"
                 "ffffffff81200000 D some_data\n")
    return KernelSymbols(m)


def test_addresses_are_named_by_the_nearest_text_symbol(tmp_path: Path) -> None:
    syms = _symbols(tmp_path)
    assert syms.name(0xFFFFFFFF81100050) == "mutex_spin_on_owner+0x50"
    assert syms.name(0xFFFFFFFF81100200) == "smp_call_function_many_cond+0x0"
    assert syms.name(0x1000) == "0x1000"                   # below the kernel
    assert syms.name(0xFFFFFFFFC0001234) == "0xffffffffc0001234"  # a module


def test_a_vcpu_spinning_in_every_sample_is_the_guest_deadlock() -> None:
    spin = "mutex_spin_on_owner+0x50"
    line = diagnose([["smp_call_function_many_cond+0x2ab", spin],
                     ["native_apic_mem_write+0x6", spin]])
    assert line.startswith("guest-side deadlock: vCPU1 spins in mutex_spin_on_owner"), line


def test_a_vcpu_that_moves_is_not_called_a_deadlock() -> None:
    line = diagnose([["mutex_spin_on_owner+0x50"], ["default_idle+0x10"]])
    assert line.startswith("guest still running"), line
    assert "default_idle+0x10" in line and "mutex_spin_on_owner+0x50" in line
    assert diagnose([]).startswith("vCPU state unknown")


def test_registers_are_read_from_a_monitor_socket(tmp_path: Path) -> None:
    """A fake monitor that answers ``info registers -a`` for two vCPUs."""
    path = str(tmp_path / "mon.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen()
    asked: list[bytes] = []

    def serve() -> None:
        for _ in range(2):
            conn, _addr = srv.accept()
            with conn:
                asked.append(conn.recv(100))
                conn.sendall(b"CPU#0\nRIP=ffffffff81100050 RFL=00000046\n"
                             b"CPU#1\nRIP=ffffffff81100210 RFL=00000202\n")

    t = threading.Thread(target=serve)
    t.start()
    sites = vcpu_sites(path, _symbols(tmp_path), samples=2)
    t.join()
    srv.close()
    assert asked == [b"info registers -a\n"] * 2
    assert sites == [["mutex_spin_on_owner+0x50", "smp_call_function_many_cond+0x10"]] * 2
    assert vcpu_sites(str(tmp_path / "absent.sock"), _symbols(tmp_path)) == []
