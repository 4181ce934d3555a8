"""
netd installs like any twistd plugin: wheel and editable installs into a new
virtualenv, and a plugin directory the daemon's user cannot write to.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import site
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
ECHO_ONLY = """
services:
  echo: {type: echo, listen: ["tcp:0:interface=127.0.0.1"]}
"""


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    # pytest's tmp_path is private to root; the read-only case runs as nobody.
    path = Path(tempfile.mkdtemp(prefix="netd-pkg-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def new_venv(where: Path) -> Path:
    """A virtualenv that borrows the test environment's dependencies, not netd."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dependencies = [p for p in site.getsitepackages() if "site-packages" in p]
    (Path(purelib) / "_deps.pth").write_text("\n".join(dependencies) + "\n")
    return python


def pip(python: Path, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", *args],
        check=True,
        cwd=ROOT,
    )


def build_wheel(into: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(into),
            str(ROOT),
        ],
        check=True,
    )


def twistd(python: Path, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "-c", "from twisted.scripts.twistd import run; run()", *args],
        capture_output=True,
        text=True,
        timeout=60,
        **kwargs,  # type: ignore[call-overload]
    )


def lists_netd(help_text: str) -> bool:
    return any(line.split()[:1] == ["netd"] for line in help_text.splitlines())


def runs_echo(python: Path, workdir: Path) -> None:
    config = workdir / "netd.yaml"
    config.write_text(ECHO_ONLY)
    check = subprocess.run(
        [str(python), "-m", "netd.cli", "check", str(config)],
        capture_output=True,
        text=True,
        cwd=workdir,
    )
    assert check.returncode == 0, check.stderr
    assert "echo (echo)" in check.stdout


@pytest.fixture(scope="session")
def netd_wheel(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """
    netd's wheel, built once a run: building it is most of these tests' cost, so
    xdist's workers share one, the first to ask building it under a lock.
    """
    run_root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        run_root = run_root.parent  # every worker's basetemp is under the run's
    wheels = run_root / "netd-wheel"
    with (run_root / "netd-wheel.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not any(wheels.glob("netd-*.whl")):
            build_wheel(wheels)
    [wheel] = wheels.glob("netd-*.whl")
    return wheel


@pytest.fixture
def wheel_python(world_readable_dir: Path, netd_wheel: Path) -> Path:
    """The python of a new virtualenv with netd installed from its wheel."""
    python = new_venv(world_readable_dir / "venv")
    pip(python, str(netd_wheel))
    return python


def serves_from(python: Path, workdir: Path) -> None:
    """twistd lists netd, netd checks a map, and the dashboard's files are there."""
    result = twistd(python, "--help")
    assert result.returncode == 0, result.stderr
    assert lists_netd(result.stdout), result.stdout
    runs_echo(python, workdir)
    # The dashboard's page is package data: the installed netd finds every file.
    assets = subprocess.run(
        [str(python), "-c", "from netd.dashboard import _load_assets; print(*_load_assets())"],
        capture_output=True,
        text=True,
        cwd=workdir,
    )
    assert set(assets.stdout.split()) >= {"index.html", "app.js", "app.css"}, assets.stderr


def test_wheel_installs_into_new_venv(world_readable_dir: Path, wheel_python: Path) -> None:
    serves_from(wheel_python, world_readable_dir)


def test_editable_install_into_new_venv(world_readable_dir: Path) -> None:
    python = new_venv(world_readable_dir / "venv")
    pip(python, "--no-build-isolation", "-e", str(ROOT))
    serves_from(python, world_readable_dir)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run twistd as nobody")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_read_only_install_still_finds_the_plugin(
    world_readable_dir: Path, wheel_python: Path
) -> None:
    python = wheel_python
    # No dropin.cache written at install time, and the directory belongs to root:
    # the daemon's user can neither create nor refresh the cache.
    for cache in python.parents[1].rglob("dropin.cache"):
        cache.unlink()
    result = subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            str(python),
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--help",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=world_readable_dir,
    )
    assert result.returncode == 0, result.stderr
    assert lists_netd(result.stdout)
    assert "Traceback" not in result.stderr


THROWAWAY_TEST = """
import urllib.request


def test_client_calls_the_api(netd):
    server = netd({"services": {"api": {
        "type": "http", "listen": ["tcp:0:interface=127.0.0.1"], "record": 10,
        "routes": [{"path": "/v1/ping", "body": "pong"}]}}})
    with urllib.request.urlopen(server.url("api", path="/v1/ping")) as answer:
        assert answer.read() == b"pong"
    assert [r["path"] for r in server.requests("api")] == ["/v1/ping"]
"""


def test_another_projects_suite_needs_one_install_and_ten_lines(
    world_readable_dir: Path, wheel_python: Path
) -> None:
    """The wheel alone brings the pytest plugin: no conftest, no fixture code."""
    python = wheel_python
    project = world_readable_dir / "project"
    project.mkdir()
    (project / "test_app.py").write_text(THROWAWAY_TEST)
    assert len(THROWAWAY_TEST.strip().splitlines()) <= 10
    result = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=project,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
