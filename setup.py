"""Build hook for the C split-ring engine; all project metadata lives in pyproject.toml.

setuptools reads no ``cffi_modules`` key from pyproject.toml, so the cffi extension
``vhost_rpmsg._vring_c`` (cext/build_vring.py) is declared here.  The sdist also needs
the extension's header and build script, which setuptools would leave out.
"""

from setuptools import setup
from setuptools.command.sdist import sdist

CEXT_FILES = ["cext/build_vring.py", "cext/vring.c", "cext/vring.h",
              "cext/build_guest.py", "cext/guest_ring.c", "cext/guest_ring.h",
              "cext/le.h"]


class SdistWithCext(sdist):
    def make_distribution(self) -> None:
        self.filelist.extend(f for f in CEXT_FILES if f not in self.filelist.files)
        super().make_distribution()


setup(
    cffi_modules=["cext/build_vring.py:ffibuilder", "cext/build_guest.py:ffibuilder"],
    cmdclass={"sdist": SdistWithCext},
)
