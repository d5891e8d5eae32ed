"""README.md and docs/*.md as a user reads them: every command and code block is run.

Fenced blocks, by language:

* ``sh``: run as one bash script (``set -eo pipefail``) in a scratch directory that links
  the project's top-level files (so ``qemu-configs/…`` resolves, and a ``--json
  bench.json`` lands there), with this interpreter's ``bin`` directory (``vhost-rpmsg``,
  ``python``) first on PATH.  Three rewrites, nothing else:

  - paths under ``/tmp/`` move into the test's own temporary directory, so runs collide
    neither with each other nor with a user's server;
  - ``[--option …]`` is an optional argument, left out;
  - ``pip install SPEC`` (alone, or before ``&&``) is checked, not run: these tests run in
    the environment it made.  SPEC must name this project and extras it declares.  A
    ``python -m pytest …`` is not run from inside pytest: ``.ci/run`` runs README's
    (test_ci_runs_readme_test_command checks it is the same line).
* ``python``: run as a script by this interpreter, in the scratch directory.
* no language, or ``text``: an illustration (a diagram, sample output), not run.

An HTML comment on the line before the opening fence (blank lines between are allowed)
changes that:

* ``<!-- test: skip REASON -->``: not run; the reason, required, is the skip reason.
* ``<!-- test: qemu -->``: needs QEMU and the provisioned guest image (see
  qemu-configs/): run by a ``qemu``-marked test, which skips where the image is not
  provisioned (fails with VHOST_RPMSG_REQUIRE_QEMU=1, as in CI).
* ``<!-- test: server -->`` (sh): the block's first command is a server that stays in the
  foreground.  It is started; once its ``--socket-path`` exists, the simulated guest
  attaches and each ``--endpoint NAME:…@ADDR`` must be announced to it at ADDR; then the
  rest of the block runs, the server gets SIGTERM and must exit with status 0.
* ``<!-- test: output -->`` (on a ``text`` block): the exact standard output of the block
  before it.

Keep the exceptions few: each is a place where a reader's command is not checked.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import kill_group, require_guest_image
from vhost_rpmsg.guest import SimGuest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGS = {"sh", "python"}
MARKERS = {"skip", "qemu", "server", "output"}
BLOCK_TIMEOUT = 280  # seconds: a hang guard below pytest-timeout's 300, not a speed check

FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*test:\s*(?P<kind>[\w-]+)\s*(?P<arg>.*?)\s*-->\s*$")
PIP = re.compile(r"^pip install (?P<spec>\S+)(?:\s*&&\s*(?P<rest>.*))?$")
OPTIONAL = re.compile(r"\s\[--[^\]]*\]")


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: str | None = None
    marker_arg: str = ""
    output: Block | None = None  # the expected stdout, a following ``output`` block

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse_blocks(path: Path, text: str | None = None) -> list[Block]:
    """The fenced blocks of a Markdown file (or of ``text``), each with its marker."""
    lines = (path.read_text() if text is None else text).splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = len(m["indent"]), m["lang"], i
        body: list[str] = []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][indent:])
            i += 1
        i += 1  # the closing fence
        block = Block(path, start + 1, lang, "\n".join(body) + "\n")
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        mk = MARKER.match(lines[j]) if j >= 0 else None
        if mk:
            block.marker, block.marker_arg = mk["kind"], mk["arg"]
        blocks.append(block)
    return blocks


def all_blocks() -> list[Block]:
    blocks = [b for path in DOCS for b in parse_blocks(path)]
    for before, block in itertools.pairwise(blocks):
        if block.marker == "output" and before.path == block.path:
            before.output = block
    return blocks


def commands(script: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, blank and comment lines
    dropped (a trailing comment stays, bash ignores it)."""
    out: list[str] = []
    pending = ""
    for line in script.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line.strip())
    return out


def check_pip_spec(spec: str) -> set[str]:
    """``pip install SPEC`` from the project root installs this project: its extras."""
    (word,) = shlex.split(spec)
    m = re.fullmatch(r"\.(?:\[(?P<extras>[\w,-]+)\])?", word)
    assert m, f"pip install {spec}: expected the project root, '.' or '.[extras]'"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = set(m["extras"].split(",")) if m["extras"] else set()
    unknown = extras - set(project.get("optional-dependencies", {}))
    assert not unknown, f"pip install {spec}: pyproject.toml declares no extra {unknown}"
    return extras


def prepare_sh(block: Block, tmp: Path) -> str:
    """The block as the script that is run (see the module docstring for the rewrites)."""
    out: list[str] = []
    for cmd in commands(block.text):
        cmd = OPTIONAL.sub("", cmd.replace("/tmp/", f"{tmp}/"))
        m = PIP.match(cmd)
        if m:
            check_pip_spec(m["spec"])
            cmd = m["rest"] or ""
        if re.match(r"^python3? -m pytest\b", cmd):
            continue
        if cmd:
            out.append(cmd)
    return "\n".join(out) + "\n"


def scratch(tmp_path: Path) -> Path:
    """A directory to run a block in: the project's top-level files linked in, but not
    the package or the tests, so code imports the installed vhost_rpmsg as a user's would."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name in ("vhost_rpmsg", "tests", "build") \
                or entry.suffix == ".so" or entry.name.endswith(".egg-info"):
            continue
        if entry.name == "examples":  # a copy: pip builds in place, and not in the checkout
            shutil.copytree(entry, cwd / entry.name,
                            ignore=shutil.ignore_patterns("build", "*.egg-info"))
        else:
            (cwd / entry.name).symlink_to(entry)
    (tmp_path / "tmp").mkdir()
    return cwd


def environment() -> dict[str, str]:
    bindir = Path(sys.executable).parent
    if not (bindir / "vhost-rpmsg").exists():
        pytest.fail(f"vhost-rpmsg is not installed beside {sys.executable}: "
                    "pip install '.[test]' first")
    return {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}


def run(argv: list[str], cwd: Path, block: Block) -> str:
    """Run ``argv`` for ``block``; it must exit 0.  Its stdout."""
    proc = subprocess.Popen(argv, cwd=cwd, env=environment(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{block.where} still running after {BLOCK_TIMEOUT} s (a hang?)\n"
                    f"--- stdout\n{stdout}\n--- stderr\n{stderr}")
    finally:
        kill_group(proc)  # what it left running in the background
    assert proc.returncode == 0, (
        f"{block.where} exited with status {proc.returncode}\n--- stdout\n{stdout}"
        f"\n--- stderr\n{stderr}")
    return stdout


def run_sh(block: Block, tmp_path: Path) -> str:
    cwd = scratch(tmp_path)
    script = prepare_sh(block, tmp_path / "tmp")
    # Background jobs (``cmd &``) end with the block.
    prologue = "set -eo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
    return run(["bash", "-c", prologue + script], cwd, block)


def run_server_block(block: Block, tmp_path: Path) -> str:
    cwd = scratch(tmp_path)
    first, *rest = prepare_sh(block, tmp_path / "tmp").splitlines()
    args = shlex.split(first, comments=True)
    opts = dict(itertools.pairwise(args))
    path = opts.get("--socket-path") or opts.get("-s")
    assert path, f"{block.where}: a server block starts with a command given --socket-path"
    log = tmp_path / "server.log"
    with log.open("w") as log_f:
        server = subprocess.Popen(["bash", "-c", "exec " + first], cwd=cwd, env=environment(),
                                  stdout=log_f, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 60  # a hang guard, not a speed check
        while not os.path.exists(path):
            try:
                server.wait(0.05)
            except subprocess.TimeoutExpired:
                if time.monotonic() < deadline:
                    continue
                pytest.fail(f"{block.where}: not listening on {path} after 60 s:\n"
                            f"{log.read_text()}")
            pytest.fail(f"{block.where}: the server exited with status {server.returncode}"
                        f" before listening:\n{log.read_text()}")
        named = [(m[1], int(m[2])) for a, b in itertools.pairwise(args)
                 if a in ("--endpoint", "-e") and (m := re.match(r"([^:@,]+):[^@,]+@(\d+)", b))]
        with SimGuest(path) as guest:
            for name, addr in named:
                assert guest.wait_channel(name, timeout=30).addr == addr, (name, addr)
        out = run(["bash", "-c", "set -eo pipefail\n" + "\n".join(rest) + "\n"], cwd, block)
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        assert server.returncode == 0, (f"{block.where}: the server exited with status "
                                        f"{server.returncode} on SIGTERM:\n{log.read_text()}")
        return out
    finally:
        kill_group(server)


def _params() -> list[object]:
    out: list[object] = []
    for b in all_blocks():
        if b.lang not in RUN_LANGS or b.marker == "output":
            continue
        marks = [pytest.mark.qemu] if b.marker == "qemu" else []
        out.append(pytest.param(b, id=b.where, marks=marks))
    return out


@pytest.mark.parametrize("block", _params())
def test_doc_block(block: Block, tmp_path: Path) -> None:
    """The block runs to a clean exit (and prints its documented output, if any)."""
    if block.marker == "skip":
        pytest.skip(f"{block.where}: {block.marker_arg}")
    if block.marker == "qemu":
        require_guest_image()
    if block.lang == "python":
        cwd = scratch(tmp_path)
        script = cwd / "block.py"
        script.write_text(block.text)
        out = run([sys.executable, str(script)], cwd, block)
    elif block.marker == "server":
        out = run_server_block(block, tmp_path)
    else:
        out = run_sh(block, tmp_path)
    if block.output is not None:
        assert out == block.output.text, (
            f"{block.where} printed\n{out}\nbut {block.output.where} says\n{block.output.text}")


def test_markers_are_well_formed() -> None:
    """Every marker is known and sits where it means something; there are blocks to run."""
    blocks = all_blocks()
    assert sum(b.lang in RUN_LANGS for b in blocks) >= 5
    for b in blocks:
        if b.marker is None:
            continue
        assert b.marker in MARKERS, f"{b.where}: unknown marker test: {b.marker}"
        if b.marker == "skip":
            assert b.marker_arg, f"{b.where}: a skip needs its reason"
        if b.marker == "server":
            assert b.lang == "sh", f"{b.where}: server marks an sh block"
        if b.marker == "output":
            assert b.lang == "text", f"{b.where}: output marks a text block"
            assert any(o.output is b and o.lang in RUN_LANGS for o in blocks), (
                f"{b.where}: an output block follows the block whose output it is")


def test_marker_scheme_is_applied() -> None:
    """The rules read Markdown as written here (guards the parser the tests rely on)."""
    text = ("x\n<!-- test: skip needs a TTY -->\n\n```sh\nvhost-rpmsg a \\\n  --b c  # d\n"
            "# comment\n\npip install '.[test]' && vhost-rpmsg e [--mmio]\n```\n"
            "```python\nprint(1)\n```\n<!-- test: output -->\n```text\n1\n```\n"
            "  ```sh\n  echo /tmp/x\n  ```\n")
    blocks = parse_blocks(ROOT / "docs" / "probe.md", text)
    assert [(b.lang, b.marker, b.line) for b in blocks] == [
        ("sh", "skip", 4), ("python", None, 11), ("text", "output", 15), ("sh", None, 18)]
    assert blocks[0].marker_arg == "needs a TTY"
    assert commands(blocks[0].text) == [
        "vhost-rpmsg a    --b c  # d", "pip install '.[test]' && vhost-rpmsg e [--mmio]"]
    assert prepare_sh(blocks[0], Path("/w")) == "vhost-rpmsg a    --b c  # d\nvhost-rpmsg e\n"
    assert prepare_sh(blocks[3], Path("/w")) == "echo /w/x\n"
    with pytest.raises(AssertionError, match="declares no extra"):
        check_pip_spec("'.[nonesuch]'")
    with pytest.raises(AssertionError, match="project root"):
        check_pip_spec("vhost-rpmsg")


# -- README's two opening commands, and .ci/run ---------------------------------------


def opening_commands() -> list[str]:
    first_sh = next(b for b in parse_blocks(ROOT / "README.md") if b.lang == "sh")
    return commands(first_sh.text)


def test_readme_opening_commands_are_well_formed() -> None:
    """Install-and-demo, then install-and-test: each installs this project, then runs
    what that install provides."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    demo, tests = opening_commands()
    m = PIP.match(demo)
    assert m and m["rest"], demo
    check_pip_spec(m["spec"])
    program, subcommand = shlex.split(m["rest"])
    assert program in project["scripts"], f"{program} is not a script of this project"
    help_out = run([program, subcommand, "--help"], ROOT, Block(ROOT / "README.md", 0, "sh",
                                                                demo))
    assert "Usage" in help_out
    m = PIP.match(tests)
    assert m and m["rest"], tests
    assert "test" in check_pip_spec(m["spec"]), tests
    assert shlex.split(m["rest"])[:3] == ["python", "-m", "pytest"], tests
    deps = project["optional-dependencies"]["test"]
    assert any(re.match(r"pytest\b(?!-)", d) for d in deps), deps


def test_ci_runs_readme_test_command() -> None:
    """.ci/run runs README's test command last, verbatim, after the provisioning and
    with the CI requirements exported."""
    _, tests = opening_commands()
    steps = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert steps[-1] == tests
    for needed in ("bash qemu-configs/provision.sh", "export VHOST_RPMSG_REQUIRE_CFFI=1",
                   "export VHOST_RPMSG_REQUIRE_QEMU=1"):
        assert needed in steps[:-1], needed
