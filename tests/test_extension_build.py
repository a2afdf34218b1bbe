"""Kernel builds never hang on a lock left by a killed build, and wait for a live one only as long as allowed."""

import fcntl
import subprocess
import sys

import pytest

from lmshrink.runtime import extension


@pytest.fixture
def build_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    return tmp_path


def _fake_load(calls):
    def load(*, name, sources, extra_cflags, build_directory, verbose):
        calls.append((name, build_directory, (extension.build_directory(name) / extension.TORCH_BATON).exists()))
        return "module"
    return load


def test_a_lock_left_by_a_killed_build_is_cleared(build_root):
    folder = extension.build_directory("demo")
    folder.mkdir(parents=True)
    (folder / extension.TORCH_BATON).touch()  # what torch leaves when its build is killed; it would wait forever
    calls = []
    assert extension.load_extension("demo", ["x.cpp"], ["-O3"], load=_fake_load(calls)) == "module"
    assert calls == [("demo", str(folder), False)]
    assert str(folder).startswith(str(build_root))


def test_a_live_build_is_waited_for_only_as_long_as_allowed(build_root):
    folder = extension.build_directory("demo")
    folder.mkdir(parents=True)
    with open(folder / extension.FLOCK_NAME, "a+") as other:  # another open file: conflicts like another process
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        (folder / extension.TORCH_BATON).touch()  # the live builder's baton must survive
        with pytest.raises(extension.BuildBusyError, match="another process has been building demo"):
            extension.load_extension("demo", ["x.cpp"], [], wait_s=0.3, poll_s=0.05, load=_fake_load([]))
        assert (folder / extension.TORCH_BATON).exists()


def test_the_lock_of_a_builder_that_died_is_released(build_root):
    folder = extension.build_directory("demo")
    folder.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f.fileno(), fcntl.LOCK_EX); "
        "open(sys.argv[2], 'w').close(); print('held', flush=True); time.sleep(600)"),
        str(folder / extension.FLOCK_NAME), str(folder / extension.TORCH_BATON)],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(extension.BuildBusyError):
            extension.load_extension("demo", [], [], wait_s=0.2, poll_s=0.05, load=_fake_load([]))
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()
    calls = []
    assert extension.load_extension("demo", [], [], wait_s=5, poll_s=0.05, load=_fake_load(calls)) == "module"
    assert calls == [("demo", str(folder), False)]
