"""The ``lossd`` command as a user runs it: the installed script in a subprocess.

Version, defaults in every ``--help``, ``serve --help`` in sections, a closed pipe, and
``eval --top`` agreeing with the HTML report.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lossd
from lossd._cli import EXIT_BROKEN_PIPE, build_parser
from lossd._eval import REPORT_HARDEST
from lossd_server.app import LossdServer
from lossd_server.settings import HELP_GROUPS, Settings

LOSSD = str(Path(sys.executable).parent / "lossd")


def lossd_cmd(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """``lossd ARGS`` in a subprocess (this environment, so this checkout's packages)."""
    return subprocess.run([LOSSD, *args], capture_output=True, text=True, timeout=120,
                          check=False, **kwargs)  # type: ignore[call-overload]


def squeezed(text: str) -> str:
    """``text`` without whitespace: help wraps lines anywhere, even inside a default."""
    return "".join(text.split())


def test_version_prints_the_package_version() -> None:
    done = lossd_cmd("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"lossd {lossd.__version__}\n"


@pytest.mark.parametrize("command", ["eval", "losses"])
def test_client_command_help_shows_every_default(command: str) -> None:
    sub = next(a for a in build_parser()._actions
               if isinstance(a, argparse._SubParsersAction)).choices[command]
    given = [a for a in sub._actions if a.option_strings and a.default not in (
        None, False, [], argparse.SUPPRESS)]
    assert given  # --target, and for eval --loss, --batch-size, --top
    done = lossd_cmd(command, "--help")
    assert done.returncode == 0, done.stderr
    text = squeezed(done.stdout)
    for action in given:
        assert f"default:{action.default}" in text, action.option_strings


def serve_help_sections() -> dict[str, list[str]]:
    """``lossd serve --help``: section title -> the flags listed under it, in order."""
    done = lossd_cmd("serve", "--help")
    assert done.returncode == 0, done.stderr
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for line in done.stdout.splitlines():
        if re.fullmatch(r"[a-z ]+:", line):
            current = sections.setdefault(line[:-1], [])
        elif m := re.match(r"  (?:-[a-z], )?(--[a-z-]+)", line):
            current.append(m.group(1))
    return sections


def test_serve_help_is_in_sections_with_every_default() -> None:
    sections = serve_help_sections()
    assert list(sections) == ["options", "network", "processes", "limits", "security",
                              "device", "observability", "plugins"]
    assert sections.pop("options") == ["--help"]
    flags = {f.name: f.metadata.get("flag") or "--" + f.name.replace("_", "-")
             for f in dataclasses.fields(Settings)}
    assert sections == {
        title: [flags[n] for n in names] for title, names in HELP_GROUPS.items()}
    assert sorted(flag for names in sections.values() for flag in names) == sorted(
        flags.values())  # every setting, once
    text = squeezed(lossd_cmd("serve", "--help").stdout)
    for f in dataclasses.fields(Settings):
        assert squeezed(f"[env {Settings.env_name(f.name)}; default: {f.default!r}]") in text


def test_every_setting_has_one_help_section() -> None:
    grouped = [name for names in HELP_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(f.name for f in dataclasses.fields(Settings))


def closed_pipe_run(*args: str) -> subprocess.CompletedProcess[str]:
    """``lossd ARGS`` writing to a pipe whose reader has already gone (``| head`` done)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([LOSSD, *args], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=120, check=False)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("command", ["losses", "help"])
def test_a_closed_pipe_ends_quietly(server: LossdServer, command: str) -> None:
    args = ("losses", "--target", f"127.0.0.1:{server.port}") if command == "losses" \
        else ("serve", "--help")
    done = closed_pipe_run(*args)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode == EXIT_BROKEN_PIPE == 141


def report_hardest(html: str) -> tuple[int, list[int]]:
    """The report's hardest-samples section: the count in its title, and the indices."""
    m = re.search(r"<h2>Hardest samples \((\d+)\)</h2>.*?<tbody>(.*?)</tbody>", html, re.S)
    assert m, "no hardest-samples section"
    rows = re.findall(r"<tr><td[^>]*>(\d+)</td>", m.group(2))
    return int(m.group(1)), [int(i) for i in rows]


def test_eval_top_and_the_report_list_the_same_samples(server: LossdServer,
                                                       tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 6)).astype(np.float32)
    t = rng.integers(0, 6, 500)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    common = ["eval", "--target", f"127.0.0.1:{server.port}", str(tmp_path / "x.npy"),
              str(tmp_path / "t.npy"), "--no-progress", "--batch-size", "128"]

    done = lossd_cmd(*common, "--top", "7", "--report", str(tmp_path / "top.html"))
    assert done.returncode == 0, done.stderr
    printed = done.stdout.split("top 7 hardest samples\n", 1)[1].splitlines()[1:8]
    assert len(printed) == 7
    count, listed = report_hardest((tmp_path / "top.html").read_text())
    assert count == 7
    assert listed == [int(row.split()[0]) for row in printed]

    done = lossd_cmd(*common, "--report", str(tmp_path / "default.html"))
    assert done.returncode == 0, done.stderr
    assert "hardest samples" not in done.stdout  # nothing asked to print
    count, listed = report_hardest((tmp_path / "default.html").read_text())
    assert count == len(listed) == REPORT_HARDEST
