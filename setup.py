"""Build hook for the C extensions; all project metadata lives in pyproject.toml.

setuptools reads no ``cffi_modules`` key from pyproject.toml, so the cffi extensions
``_vhost_rpmsg_vring`` (cext/build_vring.py), ``_vhost_rpmsg_headers``
(cext/build_rpmsg.py) and ``_vhost_rpmsg_guest`` (cext/build_guest.py) are declared here.  They are top-level modules, not inside the
``vhost_rpmsg`` package, so that the installed ones are found also when the package itself
is imported from a checkout (``python -m pytest`` puts the project root first on
sys.path, and the work tree has no compiled modules).  The sdist also needs the
extensions' headers and build scripts, which setuptools would leave out.

The ring engine ``_vhost_rpmsg_vring`` and the rpmsg header check
``_vhost_rpmsg_headers`` are mandatory: a failure to build them fails the install.  The simulated guest's fast path ``_vhost_rpmsg_guest`` is optional: a failure
to build it is a warning (the simulator then runs its pure-Python path), and
``VHOST_RPMSG_NO_SIMULATOR_C=1`` leaves it out altogether.
"""

import glob
import logging
import os
from importlib.machinery import EXTENSION_SUFFIXES

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.sdist import sdist

CEXT_FILES = ["cext/_build_common.py", "cext/ring_primitives.h",
              "cext/build_vring.py", "cext/vring.c", "cext/vring.h",
              "cext/build_rpmsg.py", "cext/rpmsg_headers.c", "cext/rpmsg_headers.h",
              "cext/datagrams.c",
              "cext/build_guest.py", "cext/guest_ring.c", "cext/guest_ring.h"]

SIMULATOR_C = "_vhost_rpmsg_guest"
NO_SIMULATOR_C = os.environ.get("VHOST_RPMSG_NO_SIMULATOR_C", "") not in ("", "0")


class SdistWithCext(sdist):
    def make_distribution(self) -> None:
        self.filelist.extend(f for f in CEXT_FILES if f not in self.filelist.files)
        super().make_distribution()


class BuildExtOptionalSimulator(build_ext):
    """build_ext where the simulator's extension may fail (setuptools' Extension.optional:
    its error is logged as a warning, and no module is installed for it).

    A build directory is reused (pip builds a local project in place), and everything in
    its build_lib goes into the wheel: so a simulator module left there by an earlier
    build is removed when the simulator is skipped or fails to build, lest a stale one
    be installed.
    """

    def finalize_options(self) -> None:
        super().finalize_options()
        for ext in self.extensions:
            if ext.name == SIMULATOR_C:
                ext.optional = True

    def _remove_stale_simulator(self) -> None:
        for suffix in EXTENSION_SUFFIXES:
            for old in glob.glob(os.path.join(glob.escape(self.build_lib), SIMULATOR_C + suffix)):
                os.remove(old)

    def run(self) -> None:
        if NO_SIMULATOR_C:
            self.announce(f"VHOST_RPMSG_NO_SIMULATOR_C is set: {SIMULATOR_C} is not built",
                          logging.INFO)
            self._remove_stale_simulator()
        super().run()
        for ext in self.extensions:
            if ext.name == SIMULATOR_C and not os.path.exists(self.get_ext_fullpath(ext.name)):
                self.warn(f"{SIMULATOR_C} (the simulated guest's C fast path) was not built; "
                          "the simulator will run its pure-Python path")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception:
            if ext.name == SIMULATOR_C:
                self._remove_stale_simulator()
            raise


cffi_modules = ["cext/build_vring.py:ffibuilder", "cext/build_rpmsg.py:ffibuilder"]
if not NO_SIMULATOR_C:
    cffi_modules.append("cext/build_guest.py:ffibuilder")

setup(
    cffi_modules=cffi_modules,
    cmdclass={"sdist": SdistWithCext, "build_ext": BuildExtOptionalSimulator},
)
