"""gemma-onnx generate restarts itself once with glibc's malloc on transparent huge pages, where
the kernel grants them only on request (gemma_onnx/huge_pages.py); nowhere else, and never twice.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from gemma_onnx import __main__ as entry
from gemma_onnx import huge_pages


def test_the_tunable_is_added_where_it_helps(huge_pages_apply):
    env = huge_pages.huge_page_env({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # Other tunables are kept, in front.
    env = huge_pages.huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize(
    ("change", "environ"),
    [
        ({"_thp_mode": lambda: "always"}, {}),  # every allocation gets huge pages already
        ({"_thp_mode": lambda: "never"}, {}),  # none can
        ({"_thp_mode": lambda: None}, {}),  # the kernel does not say
        ({"_glibc_version": lambda: (2, 34)}, {}),  # before the tunable existed
        ({"_glibc_version": lambda: None}, {}),  # musl, macOS, Windows
        ({}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}),  # the user's own choice
        ({}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}),  # a restarted process: not again
        ({}, {"GEMMA_ONNX_HUGE_PAGES": "0"}),  # opted out
    ],
)
def test_no_tunable_where_it_changes_nothing(huge_pages_apply, monkeypatch, change, environ):
    for name, value in change.items():
        monkeypatch.setattr(huge_pages, name, value)
    assert huge_pages.huge_page_env(environ) is None


def test_not_off_linux(huge_pages_apply, monkeypatch):
    monkeypatch.setattr(huge_pages.sys, "platform", "darwin")
    assert huge_pages.huge_page_env({}) is None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert huge_pages._thp_mode(str(path)) == "madvise"
    assert huge_pages._thp_mode(str(tmp_path / "missing")) is None


def test_restart_runs_the_same_command_line(huge_pages_apply, monkeypatch):
    calls = []
    monkeypatch.setattr(huge_pages.os, "execve", lambda *args: calls.append(args))
    monkeypatch.setattr(sys, "orig_argv", ["python3", "/venv/bin/gemma-onnx", "generate", "hi"])
    huge_pages.reexec_with_huge_pages()
    ((executable, argv, env),) = calls
    assert executable == sys.executable
    assert argv == ["python3", "/venv/bin/gemma-onnx", "generate", "hi"]
    assert env["GLIBC_TUNABLES"] == huge_pages.TUNABLE
    calls.clear()
    monkeypatch.setenv("GLIBC_TUNABLES", huge_pages.TUNABLE)  # the restarted process
    huge_pages.reexec_with_huge_pages()
    assert calls == []


@pytest.mark.parametrize(("argv", "restarts"), [(["generate", "hi"], 1), (["build"], 0)])
def test_only_generate_restarts(monkeypatch, argv, restarts):
    calls = []
    monkeypatch.setattr(huge_pages, "reexec_with_huge_pages", lambda: calls.append(1))
    monkeypatch.setattr(sys, "argv", ["gemma-onnx", *argv])
    monkeypatch.setattr("gemma_onnx.cli.main", lambda: None)
    entry.run()
    assert len(calls) == restarts


def test_a_restarted_generate_runs_and_reports_as_before(tmp_path):
    """The real thing, on whatever this machine's kernel and libc are: the command's own error
    (no such model folder) comes back once, with its exit code."""
    done = subprocess.run(
        [sys.executable, "-m", "gemma_onnx", "generate", "--model", str(tmp_path / "no"), "hi"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("error:") == 1 and "does not exist" in done.stderr, done.stderr
