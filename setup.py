"""Build hook for the C extensions; all project metadata lives in pyproject.toml.

setuptools reads no ``cffi_modules`` key from pyproject.toml, so the cffi extensions
``_vhost_rpmsg_vring`` (cext/build_vring.py) and ``_vhost_rpmsg_guest``
(cext/build_guest.py) are declared here.  They are top-level modules, not inside the
``vhost_rpmsg`` package, so that the installed ones are found also when the package itself
is imported from a checkout (``python -m pytest`` puts the project root first on
sys.path, and the work tree has no compiled modules).  The sdist also needs the
extensions' headers and build scripts, which setuptools would leave out.

The ring engine ``_vhost_rpmsg_vring`` is mandatory: a failure to build it fails the
install.  The simulated guest's fast path ``_vhost_rpmsg_guest`` is optional: a failure
to build it is a warning (the simulator then runs its pure-Python path), and
``VHOST_RPMSG_NO_SIMULATOR_C=1`` leaves it out altogether.
"""

import os

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.sdist import sdist

CEXT_FILES = ["cext/_build_common.py", "cext/ring_primitives.h",
              "cext/build_vring.py", "cext/vring.c", "cext/vring.h",
              "cext/build_guest.py", "cext/guest_ring.c", "cext/guest_ring.h"]

SIMULATOR_C = "_vhost_rpmsg_guest"
NO_SIMULATOR_C = os.environ.get("VHOST_RPMSG_NO_SIMULATOR_C", "") not in ("", "0")


class SdistWithCext(sdist):
    def make_distribution(self) -> None:
        self.filelist.extend(f for f in CEXT_FILES if f not in self.filelist.files)
        super().make_distribution()


class BuildExtOptionalSimulator(build_ext):
    """build_ext where the simulator's extension may fail (setuptools' Extension.optional:
    its error is logged as a warning, and no module is installed for it)."""

    def finalize_options(self) -> None:
        super().finalize_options()
        for ext in self.extensions:
            if ext.name == SIMULATOR_C:
                ext.optional = True

    def run(self) -> None:
        super().run()
        for ext in self.extensions:
            if ext.name == SIMULATOR_C and not os.path.exists(self.get_ext_fullpath(ext.name)):
                self.warn(f"{SIMULATOR_C} (the simulated guest's C fast path) was not built; "
                          "the simulator will run its pure-Python path")


cffi_modules = ["cext/build_vring.py:ffibuilder"]
if not NO_SIMULATOR_C:
    cffi_modules.append("cext/build_guest.py:ffibuilder")

setup(
    cffi_modules=cffi_modules,
    cmdclass={"sdist": SdistWithCext, "build_ext": BuildExtOptionalSimulator},
)
