"""Build hook for the C split-ring engine; all project metadata lives in pyproject.toml.

setuptools reads no ``cffi_modules`` key from pyproject.toml, so the cffi extensions
``_vhost_rpmsg_vring`` (cext/build_vring.py) and ``_vhost_rpmsg_guest``
(cext/build_guest.py) are declared here.  They are top-level modules, not inside the
``vhost_rpmsg`` package, so that the installed ones are found also when the package itself
is imported from a checkout (``python -m pytest`` puts the project root first on
sys.path, and the work tree has no compiled modules).  The sdist also needs the
extensions' headers and build scripts, which setuptools would leave out.
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
