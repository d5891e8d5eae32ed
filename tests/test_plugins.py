"""Endpoint plugins: discovery, broken and clashing entry points, ``vhost-rpmsg plugins``,
``demo --endpoint``, and the example plugin in examples/, installed as a user would.

Third-party distributions are simulated by ``NAME-VERSION.dist-info`` directories (the
METADATA and entry_points.txt an installer writes) in a temporary directory on sys.path,
in-process, or on PYTHONPATH for the command in a subprocess.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from vhost_rpmsg import __version__
from vhost_rpmsg.endpoints import Endpoint
from vhost_rpmsg.endpoints.builtin import Echo, Sink, Source
from vhost_rpmsg.endpoints.registry import (
    PluginError,
    Registry,
    build,
    options,
    plain,
    summary,
)
from vhost_rpmsg.endpoints.unix import UnixBridge
from vhost_rpmsg.guest import SimGuest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "vhost-rpmsg-plugin-example"
HANG_GUARD = 120  # seconds: a subprocess that takes longer is stuck (not a speed check)


def make_dist(root: Path, name: str, entry_points: dict[str, str],
              modules: dict[str, str] | None = None, ver: str = "1.0") -> Path:
    """A distribution as an installer leaves it in ``root``: its dist-info directory
    (METADATA, and entry_points.txt with the endpoint group) and its modules."""
    info = root / f"{name.replace('-', '_')}-{ver}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[vhost_rpmsg.endpoints]\n{lines}")
    for module, text in (modules or {}).items():
        (root / f"{module}.py").write_text(textwrap.dedent(text))
    return root


LOUD = '''
    from vhost_rpmsg.endpoints import Endpoint

    class Loud(Endpoint):
        """Answers with an upper-cased payload; registered under a built-in's name."""

        def on_message(self, src, data):
            self.port.send(src, data.upper())
'''


@pytest.fixture
def on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory at the front of sys.path; the modules imported from it are forgotten
    afterwards."""
    root = tmp_path / "site"
    root.mkdir()
    before = set(sys.modules)
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in set(sys.modules) - before:
        if getattr(sys.modules[name], "__file__", "") and \
                str(root) in str(sys.modules[name].__file__):
            del sys.modules[name]


def cli(*args: str, path: list[Path] | None = None) -> subprocess.CompletedProcess[str]:
    """``vhost-rpmsg ARGS`` in a subprocess, with ``path`` on PYTHONPATH."""
    dirs = [str(p) for p in path or []]
    if os.environ.get("PYTHONPATH"):
        dirs.append(os.environ["PYTHONPATH"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dirs)}
    return subprocess.run([sys.executable, "-m", "vhost_rpmsg.cli", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=HANG_GUARD)


# -- broken entry points ---------------------------------------------------------------


@pytest.mark.parametrize(("module", "value", "reason"), [
    ("raise ImportError('needs libfoo, which is not installed')\n", "brk:Bad",
     "ImportError: needs libfoo, which is not installed"),
    ("import no_such_module_here\n", "brk:Bad", "No module named 'no_such_module_here'"),
    ("1 / 0\n", "brk:Bad", "ZeroDivisionError"),
    ("import sys\nsys.exit(3)\n", "brk:Bad", "SystemExit: 3"),
    ("x = 1\n", "brk:Bad", "AttributeError"),
    ("Bad = print\n", "brk:Bad", "not an Endpoint subclass"),
    ("class Bad:\n    pass\n", "brk:Bad", "not an Endpoint subclass"),
])
def test_a_broken_entry_point_is_reported_and_stops_nothing(
        on_path: Path, caplog: pytest.LogCaptureFixture, module: str, value: str,
        reason: str) -> None:
    marker = on_path.parent / "imported"  # the module leaves it when imported
    make_dist(on_path, "badplug", {"bad": value, "fine": "fine:Fine"},
              {"brk": f"open({str(marker)!r}, 'w').close()\n{module}",
               "fine": LOUD.replace("Loud", "Fine")})
    reg = Registry()
    bad = reg.find("bad")
    assert (bad.dist, bad.version, bad.error) == ("badplug", "1.0", None)  # not imported yet
    eps = build(["echo@1030", "sink", "fine@1040"], reg=reg)  # the others, and built-ins
    assert [type(e).__name__ for e in eps] == ["Echo", "Sink", "Fine"]
    assert not marker.exists()  # lazy: nobody asked for bad
    with caplog.at_level(logging.WARNING, logger="vhost_rpmsg"), \
            pytest.raises(PluginError, match="broken") as e:
        build(["bad@1050"], reg=reg)
    assert reason in str(e.value) and "'bad'" in str(e.value)
    assert bad.error is not None and reason in bad.error
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "'bad'" in warning.getMessage() and "badplug" in warning.getMessage()
    assert reason in warning.getMessage()
    reg.load_all()  # what `plugins` does: the rest still load
    assert reg.find("fine").loaded and reg.find("echo").load() is Echo
    assert "bad" not in reg.usable_names() and "fine" in reg.usable_names()


def test_an_entry_point_name_a_spec_cannot_hold_is_broken(on_path: Path) -> None:
    make_dist(on_path, "oddplug", {"two words": "odd:Odd"}, {"odd": LOUD})
    (odd,) = [p for p in Registry().plugins if p.dist == "oddplug"]
    assert odd.error is not None and "cannot be written in an endpoint spec" in odd.error


# -- names: built-ins win, DIST/NAME reaches every plugin -------------------------------


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_plugin_cannot_shadow_a_builtin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture,
                                          where: str) -> None:
    """Whichever comes first on sys.path, the project's own metadata or the clash."""
    root = make_dist(tmp_path / "site", "Shadow_Plug", {"echo": "loud_shadow:Loud"},
                     {"loud_shadow": LOUD}, ver="2.0")
    if where == "before":
        monkeypatch.syspath_prepend(str(root))
    else:
        monkeypatch.setattr(sys, "path", [*sys.path, str(root)])
        importlib.invalidate_caches()
    monkeypatch.delitem(sys.modules, "loud_shadow", raising=False)
    with caplog.at_level(logging.WARNING, logger="vhost_rpmsg"):
        reg = Registry()
    assert reg.resolve("echo") is Echo
    (ep,) = build(["echo@1030"], reg=reg)
    assert type(ep) is Echo
    (loud,) = build(["shadow-plug/echo@1030"], reg=reg)
    assert type(loud).__name__ == "Loud" and loud.plugin == "shadow-plug/echo"
    assert reg.resolve("Shadow_Plug/echo") is type(loud)  # spelled as the dist's name
    assert reg.resolve("vhost-rpmsg/echo") is Echo
    shadowed = reg.find("shadow-plug/echo")
    assert shadowed.shadowed and shadowed.spec_name == "shadow-plug/echo"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "'echo'" in warning and "Shadow_Plug 2.0" in warning
    assert "shadow-plug/echo" in warning


def test_one_name_from_two_distributions_must_be_qualified(on_path: Path) -> None:
    make_dist(on_path, "first-plug", {"dup": "dup_one:Loud"}, {"dup_one": LOUD})
    make_dist(on_path, "second-plug", {"dup": "dup_two:Loud"}, {"dup_two": LOUD})
    reg = Registry()
    with pytest.raises(PluginError, match="ambiguous") as e:
        build(["dup"], reg=reg)
    assert "first-plug/dup" in str(e.value) and "second-plug/dup" in str(e.value)
    one, two = (reg.resolve(f"{d}/dup") for d in ("first-plug", "second-plug"))
    assert one.__module__ == "dup_one" and two.__module__ == "dup_two"


def test_unknown_plugins_and_dists() -> None:
    reg = Registry([])
    for spec in ("nonesuch", "nobody/echo", "vhost-rpmsg/nonesuch"):
        with pytest.raises(PluginError, match="no endpoint plugin"):
            build([spec], reg=reg)


# -- what `plugins` shows ---------------------------------------------------------------


def test_plain_text_from_docstrings() -> None:
    assert plain("made by :meth:`bind` with :func:`listen_unix`'s rules") == \
        "made by bind with listen_unix's rules"
    assert plain(":class:`~vhost_rpmsg.rpmsg.batch.MessageBatch` and "
                 ":py:class:`vhost_rpmsg.Port`") == "MessageBatch and vhost_rpmsg.Port"
    assert plain("``rpmsg-raw`` or `markdown` or :ref:`the guide <plugins>`") == \
        "rpmsg-raw or markdown or the guide"

    class Doc(Endpoint):
        """First paragraph, ``quoted``,
        over two lines.

        Second paragraph.
        """

    assert summary(Doc) == "First paragraph, quoted, over two lines."
    assert summary(type("NoDoc", (Endpoint,), {})) == ""  # not the base class's


def test_options_come_from_the_constructor() -> None:
    assert options(Echo) == [] and options(Sink) == ["zero_copy=0"]
    assert options(Source) == ["dst", "size=64", "rate=100.0", "count=0"]
    assert options(UnixBridge) == ["path", "dst", "mode=0600"]

    class Base(Endpoint):
        def __init__(self, addr: int, name: str | None = None, *, depth: str = "1",
                     **rest: str) -> None:
            super().__init__(addr, name, **rest)

    class Child(Base):
        def __init__(self, addr: int, name: str | None = None, *, tag: str = "",
                     **rest: str) -> None:
            super().__init__(addr, name, **rest)

    assert options(Child) == ['tag=""', "depth=1"]


def test_plugins_lists_everything_with_its_state(tmp_path: Path) -> None:
    site = tmp_path / "site"
    marker = tmp_path / "imported"
    make_dist(site, "badplug", {"bad": "brk_mod:Bad"},
              {"brk_mod": f"open({str(marker)!r}, 'w').close()\n"
                          "raise ImportError('needs libfoo, which is not installed')\n"})
    make_dist(site, "shadowplug", {"echo": "loud_mod:Loud"}, {"loud_mod": LOUD}, ver="2.0")
    out = cli("plugins", path=[site])
    assert out.returncode == 0, out.stderr
    assert marker.exists()  # `plugins` imports each plugin to describe it
    text = out.stdout
    # one entry per plugin: a header line, then indented lines
    entries = {m[1]: m[0] for m in re.finditer(r"(?m)^(\S+)  \(.*\n(?:    .*\n)*", text)}
    assert set(entries) >= {"bad", "echo", "rpmsg-raw", "shadowplug/echo", "sink", "source",
                            "unix"}
    bad = entries["bad"]
    assert bad.startswith("bad  (badplug 1.0, brk_mod:Bad)  BROKEN\n")
    assert "ImportError: needs libfoo, which is not installed" in bad
    shadow = entries["shadowplug/echo"]
    assert shadow.startswith("shadowplug/echo  (shadowplug 2.0, loud_mod:Loud)  SHADOWED\n")
    assert "use it as shadowplug/echo" in shadow
    assert "Answers with an upper-cased payload" in shadow
    assert entries["echo"].startswith(f"echo  (built-in, vhost-rpmsg {__version__})\n")
    assert "Sends every message back" in entries["echo"]
    # the whole first paragraph, wrapped, without markup
    raw = " ".join(entries["rpmsg-raw"].split())
    assert ("Echo announced as rpmsg-raw: a Linux guest's rpmsg_char binds to it and "
            "creates /dev/rpmsgN, so guest user space can talk to the host with "
            "read/write.") in raw
    assert "announced as rpmsg-raw unless the spec names it" in raw
    assert "`" not in text
    assert all(len(line) <= 110 for line in text.splitlines())  # the non-terminal width
    assert "options: dst, size=64, rate=100.0, count=0" in entries["source"]
    assert "options: path, dst, mode=0600" in entries["unix"]
    assert "options: none" in entries["echo"]
    assert "options: zero_copy=0" in entries["sink"]
    # and the log says the same, on stderr
    assert re.search(r"WARNING .*'bad' from badplug 1.0 is broken: .*needs libfoo",
                     out.stderr)
    assert re.search(r"WARNING .*'echo' from shadowplug 2.0 .*shadowplug/echo", out.stderr)


# -- commands with broken plugins installed -----------------------------------------------


@pytest.fixture
def broken_site(tmp_path: Path) -> tuple[Path, Path]:
    """A broken plugin that leaves a marker file when something imports it."""
    site = tmp_path / "site"
    marker = tmp_path / "imported"
    make_dist(site, "badplug", {"bad": "brk_mod:Bad"},
              {"brk_mod": f"open({str(marker)!r}, 'w').close()\n"
                          "raise ImportError('needs libfoo, which is not installed')\n"})
    return site, marker


def test_demo_runs_with_a_broken_plugin_installed(broken_site: tuple[Path, Path]) -> None:
    site, marker = broken_site
    out = cli("demo", "--messages", "50", path=[site])
    assert out.returncode == 0, out.stderr
    assert "echo round trips" in out.stdout and "mismatch" not in out.stdout
    assert not marker.exists() and "badplug" not in out.stderr  # never imported


def test_serve_runs_with_a_broken_plugin_installed(tmp_path: Path,
                                                   broken_site: tuple[Path, Path]) -> None:
    site, marker = broken_site
    sock = tmp_path / "rpmsg.sock"
    env = {**os.environ, "PYTHONPATH": str(site)}
    log = tmp_path / "serve.log"
    with log.open("w") as log_f:
        server = subprocess.Popen(
            [sys.executable, "-m", "vhost_rpmsg.cli", "serve", "-s", str(sock), "-e",
             "rpmsg-raw:echo@1030"], env=env, stdout=log_f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + HANG_GUARD
        while not sock.exists():
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"not listening:\n{log.read_text()}"
            time.sleep(0.05)
        with SimGuest(str(sock)) as guest:
            assert guest.wait_channel("rpmsg-raw", timeout=30).addr == 1030
            guest.open(2000)
            guest.send(2000, 1030, b"still serving")
            assert guest.recv(2000, timeout=30) == (1030, b"still serving")
        server.send_signal(signal.SIGTERM)
        assert server.wait(HANG_GUARD) == 0, log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert not marker.exists() and "badplug" not in log.read_text()


def test_naming_a_broken_plugin_is_one_error_line(tmp_path: Path,
                                                  broken_site: tuple[Path, Path]) -> None:
    site, _ = broken_site
    for args in (["serve", "-s", str(tmp_path / "s.sock"), "-e", "bad@1030"],
                 ["demo", "--endpoint", "bad@1030"]):
        out = cli(*args, path=[site])
        assert out.returncode == 2, out
        (error,) = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert "'bad' (from badplug 1.0) is broken" in error and "needs libfoo" in error
        assert not (tmp_path / "s.sock").exists()


# -- demo --endpoint ----------------------------------------------------------------------


def summary_rows(stdout: str) -> dict[str, list[int]]:
    """The demo summary table: endpoint → [guest addr, sent, replies, handler errors]."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 5 and cells[1].isdigit():
            rows[cells[0]] = [int(c) for c in cells[1:]]
    return rows


def test_demo_tries_builtin_endpoints() -> None:
    out = cli("demo", "--endpoint", "echo@1030", "--endpoint", "sink",
              "--endpoint", "ping:source,dst=2002,count=5,rate=0", "--messages", "40",
              "--payload", "hello {i}", "--engine", "python")
    assert out.returncode == 0, out.stderr
    assert "host announced ping at address 1025" in out.stdout
    assert "sent b'hello 0'  got b'hello 0' from 1030" in out.stdout
    assert summary_rows(out.stdout) == {
        "echo@1030 (-)": [2000, 40, 40, 0],
        "sink@1024 (-)": [2001, 40, 0, 0],
        "source@1025 (ping)": [2002, 40, 5, 0],  # what the source sent it, unasked
    }


FAILING = '''
    import time

    from vhost_rpmsg.endpoints import Endpoint

    class Picky(Endpoint):
        """Echoes, except messages with a 3 in them."""

        def on_message(self, src, data):
            if b"3" in data:
                raise RuntimeError("three is right out")
            self.port.send(src, data)

    class Stuck(Endpoint):
        """Blocks the event loop."""

        def on_message(self, src, data):
            time.sleep(600)
'''


def test_demo_reports_an_endpoint_that_raises(tmp_path: Path) -> None:
    site = make_dist(tmp_path / "site", "failplug", {"picky": "failing:Picky"},
                     {"failing": FAILING})
    out = cli("demo", "--endpoint", "picky@1030", "--messages", "10", path=[site])
    assert out.returncode == 1, out
    assert summary_rows(out.stdout) == {"picky@1030 (-)": [2000, 10, 9, 1]}
    assert "picky@1030 (-) raised 1 time(s)" in out.stdout
    assert "RuntimeError: three is right out" in out.stderr  # the logged traceback


def test_demo_reports_an_endpoint_that_blocks(tmp_path: Path) -> None:
    site = make_dist(tmp_path / "site", "failplug", {"stuck": "failing:Stuck"},
                     {"failing": FAILING})
    out = cli("demo", "--endpoint", "stuck@1030", "--messages", "3", path=[site])
    assert out.returncode == 1, out
    assert "the server stopped answering: a handler is blocking its event loop" in \
        " ".join(out.stdout.split())


@pytest.mark.parametrize(("args", "hint"), [
    (["--endpoint", "nonesuch"], "no endpoint plugin 'nonesuch'"),
    (["--endpoint", "source"], "source needs dst="),
    (["--endpoint", "echo", "--payload", "x" * 497], "--payload"),
    (["--endpoint", "echo", "--wait", "-1"], "--wait"),
])
def test_demo_refuses_bad_arguments(args: list[str], hint: str) -> None:
    out = cli("demo", *args)
    assert out.returncode == 2, out
    assert out.stderr.startswith("error: ") and len(out.stderr.splitlines()) == 1
    assert hint in out.stderr


# -- the example plugin, installed ---------------------------------------------------------


def _builds_without_isolation() -> bool:
    """Whether this environment can build the example itself: setuptools with
    bdist_wheel (70.1 and later carry it; older ones need the wheel package)."""
    try:
        major, minor = (int(x) for x in version("setuptools").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    if (major, minor) >= (70, 1):
        return True
    try:
        version("wheel")
    except PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the installed example, a copy of its sources): ``pip install --target`` into a
    temporary directory (the environment is left alone), from a copy, so the build
    leaves nothing in the checkout.  Without setuptools here, pip builds it in an
    isolated environment (that needs setuptools from the package index)."""
    tmp = tmp_path_factory.mktemp("example")
    src = tmp / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                                "__pycache__"))
    target = tmp / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
           str(target)]
    if _builds_without_isolation():
        cmd.append("--no-build-isolation")
    proc = subprocess.run([*cmd, str(src)], capture_output=True, text=True,
                          timeout=HANG_GUARD)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(target.glob("vhost_rpmsg_plugin_example-0.1.0.dist-info/entry_points.txt"))
    return target, src


def test_example_own_tests_pass_installed(example: tuple[Path, Path]) -> None:
    target, src = example
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                          cwd=src, env=env, capture_output=True, text=True, timeout=HANG_GUARD)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"\b5 passed\b", proc.stdout), proc.stdout


def test_example_is_listed_by_plugins(example: tuple[Path, Path]) -> None:
    target, _ = example
    out = cli("plugins", path=[target])
    assert out.returncode == 0, out.stderr
    entry = re.search(r"(?m)^upper  .*\n(?:    .*\n)*", out.stdout)
    assert entry, out.stdout
    text = " ".join(entry[0].split())
    assert text.startswith("upper (vhost-rpmsg-plugin-example 0.1.0, vhost_rpmsg_upper:Upper)")
    assert ("Answers every message with its payload upper-cased (ASCII letters; other "
            "bytes unchanged), optionally after a prefix.") in text
    assert "announced as upper" in text and 'options: prefix=""' in text
    assert "BROKEN" not in text and "SHADOWED" not in text and "upper" not in out.stderr


def test_demo_tries_the_example(example: tuple[Path, Path]) -> None:
    target, _ = example
    out = cli("demo", "--endpoint", "upper@1030", "--messages", "100", path=[target])
    assert out.returncode == 0, out.stderr
    assert "host announced upper at address 1030" in out.stdout
    for i in range(3):
        assert f"sent b'message {i}'  got b'MESSAGE {i}' from 1030" in out.stdout
    assert summary_rows(out.stdout) == {"upper@1030 (upper)": [2000, 100, 100, 0]}
    qualified = cli("demo", "--endpoint", ":vhost-rpmsg-plugin-example/upper,prefix=x-",
                    "--messages", "5", "--payload", "hi {i}", path=[target])
    assert qualified.returncode == 0, qualified.stderr
    assert "sent b'hi 4'" not in qualified.stdout  # only the first few are shown
    assert "sent b'hi 0'  got b'x-HI 0' from 1024" in qualified.stdout
    assert summary_rows(qualified.stdout) == {
        "vhost-rpmsg-plugin-example/upper@1024 (-)": [2000, 5, 5, 0]}


def test_builtin_table_matches_the_packages_own_entry_points() -> None:
    """The built-ins are listed twice, on purpose: in registry._BUILTIN (they work
    without package metadata and cannot be shadowed) and as this package's entry points
    (for tools that list the group). The two lists must agree."""
    import tomllib

    from vhost_rpmsg.endpoints import registry

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent
                               / "pyproject.toml").read_text())
    declared = pyproject["project"]["entry-points"][registry.GROUP]
    assert declared == {name: f"{cls.__module__}:{cls.__qualname__}"
                        for name, cls in registry._BUILTIN.items()}
