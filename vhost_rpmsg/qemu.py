"""The QEMU command line that attaches a guest to a running ``vhost-rpmsg serve``.

One builder serves ``vhost-rpmsg qemu-cmdline`` and the real-guest suite
(qemu-configs/run-guest.sh boots exactly the line this prints), so the line a user
copies is the line the suite proves boots.

QEMU facts it relies on (QEMU 10.2 added the generic device used here):
- ``vhost-user-test-device[-pci]`` with ``virtio-id=7`` is a virtio-rpmsg device whose
  whole behaviour is the back-end's; the guest's RAM must be a shared memfd so the
  back-end can map it (``memory-backend-memfd,share=on`` named by ``-machine``).
- ``-accel`` takes one accelerator; TCG is the default because it works everywhere.
- No ``reconnect-ms`` on the chardev: the generic device starts its vhost-user
  handshake at realize, before a reconnecting client socket is connected, and QEMU
  11.1 then refuses to start ("Failed to set msg fds ... vhost_backend_init failed").
- virtio-mmio is legacy (v1) unless ``force-legacy=off``; modern negotiates VERSION_1
  exactly as PCI does.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, fields

ACCELERATORS = ("tcg", "kvm")

#: The microvm machine: no legacy PIC and PIT, whose timer interrupt a TCG guest can
#: take through an unprogrammed 8259 on vector 0 (a "divide error" at boot; see
#: docs/qemu.md), and a real-time clock for the guest's wall time.
MICROVM = "microvm,memory-backend=mem,rtc=on,pic=off"


@dataclass(frozen=True)
class QemuLine:
    """Everything the printed line depends on; ``args()`` gives it as argv."""

    #: None: no rpmsg device (run-guest.sh --no-device, provisioning's smoke boot)
    socket_path: str | None
    qemu: str = "qemu-system-x86_64"
    memory: str = "256M"
    vq_size: int = 256
    smp: int = 1
    mmio: bool = False
    accel: str = "tcg"
    kernel: str | None = None
    initrd: str | None = None
    append: str = "console=ttyS0"
    no_reboot: bool = False

    def __post_init__(self) -> None:
        if self.accel not in ACCELERATORS:
            raise ValueError(f"--accel must be one of {', '.join(ACCELERATORS)}, "
                             f"not {self.accel!r}")
        if self.vq_size < 1 or self.vq_size & (self.vq_size - 1) or self.vq_size > 32768:
            raise ValueError(f"--vq-size must be a power of 2 up to 32768, not {self.vq_size}")
        if self.smp < 1:
            raise ValueError(f"--smp must be at least 1, not {self.smp}")

    def args(self) -> list[str]:
        a = [self.qemu]
        if self.mmio:
            a += ["-machine", MICROVM, "-global", "virtio-mmio.force-legacy=off"]
            device = "vhost-user-test-device"
        else:
            a += ["-machine", "q35,memory-backend=mem"]
            device = "vhost-user-test-device-pci"
        a += ["-accel", self.accel, "-cpu", "host" if self.accel == "kvm" else "max",
              "-m", self.memory, "-smp", str(self.smp),
              "-object", f"memory-backend-memfd,id=mem,size={self.memory},share=on"]
        if self.socket_path is not None:
            a += ["-chardev", f"socket,id=rpmsg0,path={self.socket_path}",
                  "-device", f"{device},chardev=rpmsg0,virtio-id=7,num_vqs=2,"
                             f"vq_size={self.vq_size}"]
        a += ["-nographic", "-nic", "none"]
        if self.no_reboot:
            a.append("-no-reboot")
        if self.kernel:
            a += ["-kernel", self.kernel, "-append", self.append]
        if self.initrd:
            a += ["-initrd", self.initrd]
        return a

    def shell(self) -> str:
        """The line quoted for a POSIX shell (run-guest.sh evaluates it into argv)."""
        return shlex.join(self.args())


def main(argv: list[str]) -> int:
    """``python -m vhost_rpmsg.qemu field=value ...``: the line, with the stdlib only.

    For qemu-configs/run-guest.sh, which must also work before the package's
    dependencies are installed (provisioning's smoke boot); users run
    ``vhost-rpmsg qemu-cmdline``, which prints the same line for the same values.
    """
    kinds = {f.name: f.type for f in fields(QemuLine)}
    values: dict[str, tuple[str, str]] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in kinds:
            print(f"error: expected FIELD=VALUE with FIELD one of {', '.join(kinds)}: {arg!r}",
                  file=sys.stderr)
            return 2
        values[key] = (value, str(kinds[key]))
    try:
        typed = {k: int(v) if kind == "int" else v in ("1", "true") if kind == "bool" else v
                 for k, (v, kind) in values.items()}
        print(QemuLine(**{"socket_path": None, **typed}).shell())  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
