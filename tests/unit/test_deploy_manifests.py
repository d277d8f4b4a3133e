"""deploy/ agrees with the code: every Kubernetes manifest parses, the ConfigMap's config
loads with the daemon's one loader, the ports, probe services, paths and user are the ones
the code and the image use, the PIN is never in a ConfigMap or the environment, the pods are
locked down, and the systemd unit never restarts a refused PIN (exit 77) or a bad config."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

from hsmsign.v1 import hsmsign_pb2 as pb
from server import config
from server.errors import ConfigError, PinRefused
from tests.harness import REPO

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
CONTAINERFILE = DEPLOY / "Containerfile"
UNIT = DEPLOY / "hsmsignd.service"
#: Shows the Secrets' shape with placeholders; never applied (kustomization.yaml).
SECRETS_EXAMPLE = "secrets.example.yaml"


#: The daemon's RSS in the soak (`make soak`: 2 serving processes, 64 callers, 100,000
#: calls; docs/performance.md): the pod's memory request must cover it and the limit leave
#: room for requests in flight.
MEASURED_SOAK_RSS_MIB = 201
#: The bound one serving process holds under the memory abuse test (docs/operations.md).
ABUSE_RSS_BOUND_MIB = 384

#: The health service names the daemon sets (server/serve.py): the whole server and each
#: service of the API.
HEALTH_SERVICES = frozenset({"", *(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())})
SIGNER = pb.DESCRIPTOR.services_by_name["Signer"].full_name


def _documents() -> dict[str, list[dict[str, Any]]]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path.name} holds no document"
        out[path.name] = docs
    return out


def _objects(kind: str) -> list[dict[str, Any]]:
    return [
        d
        for name, docs in _documents().items()
        if name != SECRETS_EXAMPLE
        for d in docs
        if d.get("kind") == kind
    ]


def _one(kind: str) -> dict[str, Any]:
    found = _objects(kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _pod() -> dict[str, Any]:
    spec: dict[str, Any] = _one("Deployment")["spec"]["template"]["spec"]
    return spec


def _daemon_container() -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in _pod()["containers"] if c["name"] == "hsmsignd"]
    assert len(found) == 1
    return found[0]


def _config_text() -> str:
    text: str = _one("ConfigMap")["data"]["hsmsignd.toml"]
    return text


def _load_cluster_config(tmp_path: Path) -> config.Config:
    """The ConfigMap's hsmsignd.toml through server.config.load (which refuses unknown keys
    and bad values)."""
    path = tmp_path / "hsmsignd.toml"
    path.write_text(_config_text())
    return config.load(path)


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def _named_port(name: str) -> int:
    (port,) = [p["containerPort"] for p in _daemon_container()["ports"] if p["name"] == name]
    return int(port)


def _mebibytes(quantity: str) -> float:
    units = {"Mi": 1.0, "Gi": 1024.0}
    return float(quantity[:-2]) * units[quantity[-2:]]


def _containerfile(instruction: str) -> list[str]:
    """The arguments of every line starting with ``instruction`` (continuations joined)."""
    text = CONTAINERFILE.read_text().replace("\\\n", " ")
    return [
        line.split(None, 1)[1]
        for line in text.splitlines()
        if line.split(None, 1)[:1] == [instruction]
    ]


def test_every_manifest_parses_and_kustomize_lists_all_but_the_secret_example() -> None:
    docs = _documents()
    assert {"hsmsignd.yaml", "service.yaml", "configmap.yaml", SECRETS_EXAMPLE} <= set(docs)
    for name, objects in docs.items():
        for d in objects:
            assert d.get("apiVersion") and d.get("kind"), name
            if d["kind"] not in ("Kustomization", "Namespace"):
                assert d["metadata"]["namespace"] == "hsmsign", f"{name}: {d['kind']}"
    (kustomization,) = docs["kustomization.yaml"]
    listed = set(kustomization["resources"])
    assert listed == set(docs) - {"kustomization.yaml", SECRETS_EXAMPLE}


def test_the_configmap_config_loads_with_the_daemons_loader(tmp_path: Path) -> None:
    cfg = _load_cluster_config(tmp_path)
    assert cfg.server.tls is not None and cfg.server.tls.client_ca is not None  # mTLS
    # A fixed number of serving processes: the memory limit is sized for it.
    assert "processes = 2" in _config_text()
    assert cfg.server.processes == 2


def test_ports_agree_between_config_pod_service_and_image(tmp_path: Path) -> None:
    cfg = _load_cluster_config(tmp_path)
    grpc_port = _port(cfg.server.listen)
    server = tomllib.loads(_config_text())["server"]
    health_port = _port(server["health_listen"])
    metrics_port = _port(server["metrics_listen"])
    assert len({grpc_port, health_port, metrics_port}) == 3
    assert _named_port("grpc") == grpc_port
    assert _named_port("health") == health_port
    assert _named_port("metrics") == metrics_port
    (service_port,) = _one("Service")["spec"]["ports"]
    assert service_port["targetPort"] == "grpc" and service_port["port"] == grpc_port
    exposed = {int(p) for line in _containerfile("EXPOSE") for p in line.split()}
    assert exposed == {grpc_port, health_port, metrics_port}
    (check,) = _containerfile("HEALTHCHECK")
    assert f"127.0.0.1:{health_port}" in check


def test_probes_ask_the_health_port_for_services_the_daemon_reports(tmp_path: Path) -> None:
    cfg = _load_cluster_config(tmp_path)
    health_port = _named_port("health")
    c = _daemon_container()
    probes = {k: c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    for name, probe in probes.items():
        # Native gRPC probes: plaintext, so the health-only port, never the mTLS one.
        assert probe["grpc"]["port"] == health_port, name
        assert probe["grpc"].get("service", "") in HEALTH_SERVICES, name
    assert probes["readinessProbe"]["grpc"]["service"] == SIGNER
    if not cfg.server.key_admin:  # KeyAdmin then answers NOT_SERVING for good
        assert all(p["grpc"].get("service") != "hsmsign.v1.KeyAdmin" for p in probes.values())
    (check,) = _containerfile("HEALTHCHECK")
    assert check.rstrip().endswith(f'"{SIGNER}"]')


def test_the_pin_is_a_file_from_a_secret_never_in_a_configmap_or_the_environment(
    tmp_path: Path,
) -> None:
    cfg = _load_cluster_config(tmp_path)
    for cm in _objects("ConfigMap"):
        for text in cm.get("data", {}).values():
            # The loader refuses token.pin; no PIN-looking value or placeholder either.
            assert not re.search(r"(?im)^\s*(pin|user_pin|so_pin)\s*=", text)
            assert "REPLACE-WITH" not in text
    assert cfg.token.pin.file is not None and cfg.token.pin.env is None
    pod = _pod()
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["pin-secret"]["secret"]["secretName"] == "hsmsignd-pin"
    assert volumes["pin"]["emptyDir"]["medium"] == "Memory"
    daemon = _daemon_container()
    # The daemon's container neither mounts the Secret nor gets it in its environment.
    assert "pin-secret" not in {m["name"] for m in daemon["volumeMounts"]}
    for container in pod["containers"] + pod["initContainers"]:
        for env in container.get("env", []):
            assert "valueFrom" not in env, f"{container['name']}: {env['name']}"
        assert "envFrom" not in container
    # The init container writes the file the config names, into the volume the daemon reads.
    (init,) = pod["initContainers"]
    assert str(cfg.token.pin.file) in init["command"][-1]
    mounts = {m["name"]: m["mountPath"] for m in daemon["volumeMounts"]}
    assert str(cfg.token.pin.file).startswith(mounts["pin"] + "/")
    # The example Secrets hold placeholders only.
    for secret in _documents()[SECRETS_EXAMPLE]:
        assert secret["kind"] == "Secret"
        assert all(v.startswith("REPLACE-WITH-") for v in secret["stringData"].values())


def test_config_and_tls_paths_are_where_the_volumes_are_mounted(tmp_path: Path) -> None:
    cfg = _load_cluster_config(tmp_path)
    mounts = {m["name"]: m["mountPath"] for m in _daemon_container()["volumeMounts"]}
    assert cfg.server.tls is not None and cfg.server.tls.client_ca is not None
    for path in (cfg.server.tls.cert, cfg.server.tls.key, cfg.server.tls.client_ca):
        assert str(path).startswith(mounts["tls"] + "/"), path
    assert cfg.audit.directory is not None
    assert str(cfg.audit.directory) == mounts["audit"]
    # The image's default command, the pod's args and the ConfigMap mount name one file.
    args = _daemon_container()["args"]
    assert args[args.index("--config") + 1] == str(config.INSTALLED_CONFIG)
    assert mounts["config"] == str(config.INSTALLED_CONFIG.parent)
    (cmd,) = _containerfile("CMD")
    assert str(config.INSTALLED_CONFIG) in cmd
    # The PIN-refused marker's directory: the image's default, the pod's env and a volume.
    (env,) = [e for e in _daemon_container()["env"] if e["name"] == "HSMSIGND_STATE_DIR"]
    assert env["value"] == mounts["state"]
    assert any(f"HSMSIGND_STATE_DIR={env['value']}" in line for line in _containerfile("ENV"))
    # Draining ends before Kubernetes kills the pod.
    assert _pod()["terminationGracePeriodSeconds"] > cfg.server.grace_seconds + 1


def test_the_pods_are_locked_down_spread_and_sized() -> None:
    pod = _pod()
    user = pod["securityContext"]
    (image_user,) = _containerfile("USER")
    assert user["runAsNonRoot"] is True
    assert f"{user['runAsUser']}:{user['runAsGroup']}" == image_user.strip()
    assert user["seccompProfile"]["type"] == "RuntimeDefault"
    for c in pod["containers"] + pod["initContainers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert "limits" in c["resources"] and "memory" in c["resources"]["limits"], c["name"]
    deployment = _one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    keys = {t["topologyKey"] for t in pod["topologySpreadConstraints"]}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    service = _one("Service")["spec"]
    assert service["clusterIP"] == "None"  # headless: clients balance round_robin
    assert service["selector"].items() <= labels.items()
    pdb = _one("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["maxUnavailable"] == 1
    resources = _daemon_container()["resources"]
    assert _mebibytes(resources["requests"]["memory"]) >= MEASURED_SOAK_RSS_MIB
    assert _mebibytes(resources["limits"]["memory"]) >= 2 * MEASURED_SOAK_RSS_MIB
    # Two serving processes at the memory-abuse bound (tests/integration/test_memory_abuse.py)
    # plus the supervisor.
    assert _mebibytes(resources["limits"]["memory"]) >= 2 * ABUSE_RSS_BOUND_MIB + 60


def test_the_systemd_unit_never_restarts_a_refused_pin_or_a_bad_config() -> None:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    assert PinRefused.exit_code == 77
    (prevent,) = settings["RestartPreventExitStatus"]
    assert {str(PinRefused.exit_code), str(ConfigError.exit_code)} <= set(prevent.split())
    assert settings["LimitCORE"] == ["0"]
    assert int(settings["LimitNOFILE"][0]) >= 16384
    assert settings["NoNewPrivileges"] == ["yes"]
    (exec_start,) = settings["ExecStart"]
    assert f"--config {config.INSTALLED_CONFIG}" in exec_start
    # The credential the unit loads is the one the annotated production config reads.
    example = tomllib.loads((REPO / "hsm_config" / "production.example.toml").read_text())
    (credential,) = settings["LoadCredential"]
    assert credential.split(":")[0] == example["token"]["pin_credential"]
