"""The man page dmoverfs(8): it renders, and it says what the command does.

Every subcommand and option that `dmoverfs --help` and `dmoverfs COMMAND
--help` list must appear in the page, and every -o option of the mount helper,
so the page and the command cannot drift apart: a new option fails this test
until it is documented.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dmoverfs import __version__, mount_helper

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "dmoverfs" / "data" / "dmoverfs.8"
INSTALLED = Path(sys.prefix) / "share" / "man" / "man8" / "dmoverfs.8"
SECTIONS = [
    "NAME",
    "SYNOPSIS",
    "DESCRIPTION",
    "COMMANDS",
    "MOUNTING FROM FSTAB",
    "THE MOUNT",
    "SESSIONS",
    "FUNCTIONS",
    "IOCTL EQUIVALENTS",
    "ERRORS",
    "EXIT STATUS",
    "ENVIRONMENT",
    "FILES",
    "EXAMPLES",
    "SEE ALSO",
]


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: install man-db and groff-base (scripts/setup does)")
    return path


def render() -> str:
    """The page as plain text, on lines long enough that nothing is broken or hyphenated."""
    result = subprocess.run(
        [tool("groff"), "-man", "-Tutf8", "-rLL=400n", "-rHY=0", "-P-cbou", str(PAGE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def sections(text: str) -> dict[str, str]:
    """Rendered text by section heading (headings start in column 0)."""
    out: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.upper() == line:
            name = line.strip()
            out[name] = ""
        elif name is not None:
            out[name] += line + "\n"
    return out


def help_text(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "dmoverfs", *args, "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout


def subcommands() -> list[str]:
    """The commands `dmoverfs --help` lists, aliases included ({mount,unmount,umount,...})."""
    match = re.search(r"\{([a-z0-9,-]+)\}", help_text())
    assert match, "dmoverfs --help lists no commands"
    return match.group(1).split(",")


def options(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


def test_man_renders_it():
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8", "MANPAGER": "cat", "PAGER": "cat"}
    result = subprocess.run([tool("man"), "-l", str(PAGE)], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    found = [line for line in result.stdout.splitlines() if line in SECTIONS]
    assert found == SECTIONS
    assert result.stdout.splitlines()[0].split() == ["DMOVERFS(8)", "System", "Manager's", "Manual", "DMOVERFS(8)"]


def test_groff_finds_nothing_to_warn_about():
    result = subprocess.run([tool("groff"), "-man", "-ww", "-z", str(PAGE)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")


def test_version_in_the_title():
    title = next(line for line in PAGE.read_text().splitlines() if line.startswith(".TH "))
    assert f'"dmoverfs {__version__}"' in title


def undocumented(text: str) -> list[str]:
    """What `--help` lists and the rendered page *text* does not mention."""
    page = sections(text)
    documented = options(text)
    missing = []
    for name in subcommands():
        if not re.search(rf"(?m)(^\s*|, )(dmoverfs )?{re.escape(name)}\b", page["COMMANDS"] + page["SYNOPSIS"]):
            missing.append(f"command {name}")
        for option in sorted(options(help_text(name)) - {"--help"}):
            if option not in documented:
                missing.append(f"{name} {option}")
    for option in sorted(options(help_text()) - {"--help"}) + ["--help"]:
        if option not in documented:
            missing.append(f"dmoverfs {option}")
    return missing


def test_every_subcommand_and_option_of_help_is_documented():
    text = render()
    names = subcommands()
    assert {"mount", "unmount", "umount", "status"} <= set(names)
    missing = undocumented(text)
    assert not missing, "not in dmoverfs(8): " + ", ".join(missing)
    # Every command also has a synopsis line.
    synopsis = sections(text)["SYNOPSIS"]
    for name in names:
        if name != "umount":  # an alias, given next to unmount in COMMANDS
            assert re.search(rf"(?m)^\s*dmoverfs {re.escape(name)}\b", synopsis), name


def test_the_drift_check_can_fail():
    text = render()
    assert "mount --queue-depth" in undocumented(text.replace("--queue-depth", "--queue-size"))
    assert "command status" in undocumented(re.sub(r"\bstatus\b", "state", text))


def test_every_mount_helper_option_is_documented():
    text = sections(render())["MOUNTING FROM FSTAB"]
    for key in [*mount_helper.NUMERIC, *mount_helper.FLAGS, *mount_helper.VALUED, *mount_helper.REPEATED]:
        assert re.search(rf"\b{key}\b", text), key
    for generic in ("rw", "nodev", "nosuid", "noauto", "nofail", "_netdev", "ro", "drop_privileges"):
        assert re.search(rf"(?<![\w-]){generic}\b", text), generic


def test_contents():
    page = sections(render())
    for name in ("dmoverio", "func/NAME", "stats"):
        assert re.search(rf"(?m)^\s+{re.escape(name)}\b", page["THE MOUNT"]), name
    for attr in ("user.dmover.function", "user.dmover.nonblock", "user.dmover.server"):
        assert attr in page["IOCTL EQUIVALENTS"], attr
    for word in ("O_NONBLOCK", "DMIO_SETFUNC", "FIONBIO", "FIOASYNC", "libdmoverio.so", "func/NAME"):
        assert word in page["IOCTL EQUIVALENTS"], word
    errors = page["ERRORS"]
    for name in ("EINVAL", "ENXIO", "EFAULT", "EPERM", "ESRCH", "EBUSY", "EAGAIN", "ENFILE", "EINTR", "ENOTSUP", "ENODATA"):
        assert re.search(rf"(?m)^\s+{name}\b", errors), name
    for var in ("DMOVERFS_MOUNTPOINT", "DMOVERIO_PATH", "NOTIFY_SOCKET"):
        assert re.search(rf"(?m)^\s+{var}$", page["ENVIRONMENT"]), var
    for tunable, default in (("--queue-depth", "64"), ("--max-sessions", "4096"), ("--max-requests", "65536")):
        assert re.search(rf"{tunable} N\n\s+.*\(default {default}\b", page["COMMANDS"]), tunable
    for function in ("zero", "fill8", "copy", "xor2", "iscsi-crc32c", "fill64", "compare", "copy-crc32c"):
        assert re.search(rf"(?m)^\s+{re.escape(function)}\b", page["FUNCTIONS"]), function
    assert "dmoverio(4)" in page["SEE ALSO"] and "mount.fuse3(8)" in page["SEE ALSO"]


def test_installed_with_the_package():
    """scripts/setup installs the page into the virtualenv, where man finds it through PATH."""
    assert INSTALLED.exists(), f"{INSTALLED} is missing: run scripts/setup"
    assert INSTALLED.read_bytes() == PAGE.read_bytes(), f"{INSTALLED} is stale: run scripts/setup"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    env.pop("MANPATH", None)
    where = subprocess.run([tool("man"), "-w", "dmoverfs"], capture_output=True, text=True, timeout=60, env=env)
    assert where.returncode == 0 and Path(where.stdout.strip()) == INSTALLED, where.stdout + where.stderr
