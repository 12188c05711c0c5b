"""The deployment artefacts under ``deploy/`` agree with the code they deploy.

Nothing here builds an image or talks to a cluster. Instead each artefact is
parsed and checked against the real thing it refers to: every command line is
parsed by the real click commands (with the artefact's environment, so a
misspelt flag, an unknown ``RECONCILER_*`` variable or a bad value fails), the
probe paths are looked up in the real health server's routes, the Dockerfile's
HEALTHCHECK is run against a real health server on loopback, the secret keys
are fed to the real credentials loader, and the CI workflow's shell steps are
run with bash against the real CLI on real trees. ``kubectl kustomize`` and
``systemd-analyze verify`` are used too when installed.

Installing is checked the same way: no file says to ``pip install reconciler``
(that name on the package index is another project), every install names this
repository, and a wheel is built offline from the image's sources and read back.
``make -n demo`` shows the command line ``make demo`` runs, parsed like the rest.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import click
import pytest
import yaml

from reconciler.api.credentials import load_credentials
from reconciler.cli.app import main
from reconciler.engine.metrics import Metrics
from reconciler.serve.health import PROBES, HealthServer
from tests.conftest import REPO, tasks_yaml, write

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
#: The two-replica overlay: PostgreSQL store, leader election.
K8S_HA = DEPLOY / "kubernetes-ha"
DOCKERFILE = DEPLOY / "Dockerfile"
UNIT = DEPLOY / "systemd" / "reconciler.service"
ENV_EXAMPLE = DEPLOY / "systemd" / "env.example"
WORKFLOW = DEPLOY / "ci" / "github-actions-plan.yaml"
ENV_NAME = re.compile(r"\bRECONCILER_[A-Z0-9_]+\b")
PROJECT: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))[
    "project"
]
APP = "661e4a7b9c0d1e2f"


# --- the CLI as the artefacts use it ----------------------------------------------


def command(name: str) -> click.Command:
    assert isinstance(main, click.Group)
    assert name in main.commands, f"`reconciler {name}` is not a command"
    return main.commands[name]


def envvars(*commands: str) -> set[str]:
    """Every environment variable the group and these commands read."""
    names: set[str] = set()
    for cmd in (main, *(command(c) for c in commands)):
        for param in cmd.params:
            if isinstance(param.envvar, str):
                names.add(param.envvar)
            elif param.envvar:
                names.update(param.envvar)
    return names


def long_opts(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}


def parse_invocation(
    argv: list[str], env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """Parse ``reconciler ARGV`` under ``env`` the way click would, without running it.

    Returns the command's parameters merged with the group's. Raises (fails the
    test) on an unknown command or flag, or a value click rejects.
    """
    assert argv, "no command given"
    cmd = command(argv[0])
    for token in argv[1:]:
        if token == "--":
            break
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            assert flag in long_opts(cmd), f"`reconciler {argv[0]}` has no option {flag}"
    for name in list(os.environ):
        if name.startswith(("RECONCILER_", "VOLC_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with (
        main.make_context("reconciler", list(argv)) as parent,
        cmd.make_context(argv[0], list(argv[1:]), parent=parent) as ctx,
    ):
        return {**parent.params, **ctx.params}


def run_default(name: str) -> Any:
    for param in command("run").params:
        if param.name == name:
            return param.default
    raise AssertionError(f"`reconciler run` has no parameter {name}")


def health_routes() -> set[str]:
    server = HealthServer(metrics=Metrics(), readiness=lambda: None)
    return {r.canonical for r in server.app().router.resources()}


# --- Kubernetes -------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} defined twice"
            objects[key] = doc
    return objects


def only(objects: Mapping[tuple[str, str], dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for (k, _), o in objects.items() if k == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict[str, Any]]:
    return k8s_objects()


@pytest.fixture(scope="module")
def pod(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = only(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def containers(pod: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod.get("initContainers", [])
    yield from pod["containers"]


def container(pod: Mapping[str, Any], name: str) -> dict[str, Any]:
    for c in containers(pod):
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name}")


def git_sync_containers(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    found = [c for c in containers(pod) if "git-sync" in c["image"]]
    assert found, "no git-sync container"
    return found


def plain_env(c: Mapping[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def flag_values(args: list[str]) -> dict[str, str]:
    """``--name=value`` / ``--flag`` arguments as a mapping (value "" for bare flags)."""
    out: dict[str, str] = {}
    for arg in args:
        assert arg.startswith("--"), f"git-sync argument {arg!r} is not a --flag"
        name, _, value = arg.partition("=")
        out[name] = value
    return out


def quantity_mib(q: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1.0, "Gi": 1024.0}
    for suffix, factor in units.items():
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * factor
    raise AssertionError(f"unexpected quantity {q!r}")


def reconciler_params(pod: Mapping[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    c = container(pod, "reconciler")
    assert "command" not in c, "the image's ENTRYPOINT is `reconciler`; set args only"
    return parse_invocation(list(c["args"]), plain_env(c), monkeypatch)


def test_every_yaml_under_deploy_parses() -> None:
    files = yaml_files()
    assert {p.name for p in files} >= {
        "deployment.yaml",
        "secret.yaml",
        "pvc.yaml",
        "service.yaml",
        "networkpolicy.yaml",
        "kustomization.yaml",
        "github-actions-plan.yaml",
    }
    for path in files:
        docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        assert docs, f"{path} is empty"
        assert all(isinstance(d, dict) for d in docs), f"{path}: a document is not a mapping"


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    assert [i["name"] for i in kustomization["images"]] == ["reconciler"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_renders() -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    rendered = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out)}
    assert rendered.keys() == k8s_objects().keys()
    pod = next(d for (k, _), d in rendered.items() if k == "Deployment")["spec"]["template"]
    image = container(pod["spec"], "reconciler")["image"]
    assert image.startswith("registry.example.com/reconciler:")


def test_deployment_runs_exactly_one_controller(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    spec = only(objects, "Deployment")["spec"]
    assert spec["replicas"] == 1
    # A rolling update would briefly run two controllers against one account.
    assert spec["strategy"] == {"type": "Recreate"}
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    service = only(objects, "Service")
    assert service["spec"]["selector"].items() <= labels.items()


def test_reconciler_invocation_is_a_valid_run(
    pod: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    c = container(pod, "reconciler")
    assert c["args"][0] == "run"
    params = reconciler_params(pod, monkeypatch)
    assert params["health_host"] == "0.0.0.0"
    assert str(params["directory"]) == "/git/current/desired"
    # The state store sits on the PersistentVolumeClaim.
    state = PurePosixPath(str(params["state"]))
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    on_claim = [
        m
        for m in mounts.values()
        if "persistentVolumeClaim" in volumes[m["name"]] and not m.get("readOnly")
    ]
    assert len(on_claim) == 1
    assert state.parent == PurePosixPath(on_claim[0]["mountPath"])


def test_health_port_is_probed_scraped_and_served(
    pod: dict[str, Any],
    objects: dict[tuple[str, str], dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = container(pod, "reconciler")
    port = reconciler_params(pod, monkeypatch)["health_port"]
    assert port == 9108
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": port}
    routes = health_routes()
    expected = {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path and path in routes, probe
        assert get["port"] in ports or get["port"] == port, probe
    # The first scan of a large tree blocks the loop: allow minutes, not seconds.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    annotations = only(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] in routes
    service_ports = only(objects, "Service")["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in service_ports] == [(port, "http")]


def test_a_network_policy_admits_only_the_scraper_to_the_health_port(
    pod: dict[str, Any],
    objects: dict[tuple[str, str], dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bound to 0.0.0.0, the dashboard and /metrics are for whoever reaches the pod:
    the policy selects the pod, admits one peer (never everyone) on the health port
    alone, and leaves the probes' paths to the kubelet."""
    spec = only(objects, "NetworkPolicy")["spec"]
    labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"], "an empty selector is every pod"
    assert spec["podSelector"]["matchLabels"].items() <= labels.items()
    assert "Ingress" in spec["policyTypes"]
    c = container(pod, "reconciler")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    health_port = reconciler_params(pod, monkeypatch)["health_port"]
    assert spec["ingress"], "no rule: nothing reaches the pod, Prometheus included"
    for rule in spec["ingress"]:
        assert rule.get("from"), "a rule without 'from' admits every source"
        for peer in rule["from"]:
            selectors = [peer.get("namespaceSelector"), peer.get("podSelector")]
            assert "ipBlock" not in peer and all(s and s.get("matchLabels") for s in selectors)
        assert rule.get("ports"), "a rule without ports admits every port"
        for p in rule["ports"]:
            assert ports.get(p["port"], p["port"]) == health_port and p["protocol"] == "TCP"
    # The probes are answered without credentials, whatever the Host (the kubelet's).
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        path = c[probe]["httpGet"]["path"]
        assert path in PROBES and "httpHeaders" not in c[probe]["httpGet"], probe


def test_secret_keys_exist_and_are_the_credentials_the_code_reads(
    pod: dict[str, Any], objects: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    environ: dict[str, str] = {}
    refs = 0
    for c in containers(pod):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref is None:
                continue
            refs += 1
            secret = objects.get(("Secret", ref["name"]))
            assert secret is not None, f"no Secret {ref['name']}"
            data = {**secret.get("data", {}), **secret.get("stringData", {})}
            assert ref["key"] in data, f"Secret {ref['name']} has no key {ref['key']}"
            if c["name"] == "reconciler":
                environ[e["name"]] = data[ref["key"]]
    assert refs >= 2
    creds = load_credentials(environ=environ, path=tmp_path / "absent")
    assert creds.access_key == environ["VOLC_ACCESSKEY"]
    for secret in (o for (k, _), o in objects.items() if k == "Secret"):
        for value in secret.get("stringData", {}).values():
            assert "REPLACE" in value, "example Secret values must be obvious placeholders"


def test_volumes_and_claim_names_match(
    pod: dict[str, Any], objects: dict[tuple[str, str], dict[str, Any]]
) -> None:
    volumes = {v["name"]: v for v in pod["volumes"]}
    for c in containers(pod):
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{c['name']} mounts undefined volume {m['name']}"
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in volumes.values()
        if "persistentVolumeClaim" in v
    ]
    pvc = only(objects, "PersistentVolumeClaim")
    assert claims == [pvc["metadata"]["name"]]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    for c in containers(pod):
        for ref in c.get("envFrom", []):
            name = ref["configMapRef"]["name"]
            assert ("ConfigMap", name) in objects, f"no ConfigMap {name}"


def test_git_sync_publishes_the_path_the_reconciler_reads(
    pod: dict[str, Any],
    objects: dict[tuple[str, str], dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    directory = PurePosixPath(str(reconciler_params(pod, monkeypatch)["directory"]))
    reconciler_mounts = {
        m["name"]: m["mountPath"] for m in container(pod, "reconciler")["volumeMounts"]
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    syncs = git_sync_containers(pod)
    assert {c["name"] for c in syncs} >= {"git-sync", "git-sync-init"}
    for c in syncs:
        flags = flag_values(c["args"])
        root = PurePosixPath(flags["--root"])
        link = PurePosixPath(flags["--link"])
        published = link if link.is_absolute() else root / link
        assert directory.is_relative_to(published), f"{c['name']} publishes {published}"
        # Both containers see the same volume at the same place.
        git_mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        shared = [n for n, p in git_mounts.items() if p == str(root)]
        assert len(shared) == 1 and reconciler_mounts.get(shared[0]) == str(root)
        assert "emptyDir" in volumes[shared[0]], "the checkout belongs to the pod, not a PV"
        assert flags["--repo"] and flags["--ref"]
        # $(VAR) in args is expanded from the container's environment.
        config = {}
        for ref in c.get("envFrom", []):
            config.update(objects[("ConfigMap", ref["configMapRef"]["name"])]["data"])
        for var in re.findall(r"\$\((\w+)\)", " ".join(c["args"])):
            assert var in config, f"{c['name']} uses $({var}) which nothing defines"
    init = [c for c in pod.get("initContainers", []) if c in syncs]
    assert init and all("--one-time" in flag_values(c["args"]) for c in init)
    sidecars = [c for c in pod["containers"] if c in syncs]
    assert sidecars and all("--period" in flag_values(c["args"]) for c in sidecars)


def test_containers_run_unprivileged_with_writable_paths_mounted(
    pod: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod.get("automountServiceAccountToken") is False
    for c in containers(pod):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert "ALL" in sc["capabilities"]["drop"], c["name"]
        assert sc.get("runAsUser", 1) != 0, c["name"]
        writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
        assert "/tmp" in writable, c["name"]
    c = container(pod, "reconciler")
    assert c["securityContext"]["runAsUser"] == dockerfile_uid()
    state = PurePosixPath(str(reconciler_params(pod, monkeypatch)["state"]))
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    assert str(state.parent) in writable


def test_pod_outlives_the_drain_and_fits_its_memory(
    pod: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    drain = reconciler_params(pod, monkeypatch)["drain_timeout"]
    assert drain == run_default("drain_timeout")
    assert pod["terminationGracePeriodSeconds"] > drain
    limits = container(pod, "reconciler")["resources"]["limits"]
    # 100k tasks take up to 500 MB; leave headroom, but stay bounded.
    assert 600 <= quantity_mib(limits["memory"]) <= 2048


# --- every RECONCILER_* variable is a real option ---------------------------------


# --- Kubernetes, two replicas (deploy/kubernetes-ha: an overlay of the above) -----


def test_two_replica_overlay_lists_its_files() -> None:
    kustomization = yaml.safe_load((K8S_HA / "kustomization.yaml").read_text(encoding="utf-8"))
    assert "../kubernetes" in kustomization["resources"]
    mine = {r for r in kustomization["resources"] if not r.startswith("..")}
    patches = {p["path"] for p in kustomization["patches"] if "path" in p}
    present = {p.name for p in K8S_HA.glob("*.yaml")} - {"kustomization.yaml"}
    assert mine | patches == present


@pytest.fixture(scope="module")
def ha_objects() -> dict[tuple[str, str], dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed: the overlay is what kustomize renders")
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S_HA)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out)}


def test_two_replicas_roll_one_at_a_time_with_a_disruption_budget(
    ha_objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployment = only(ha_objects, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    # Safe with leader election: a new pod starts as a standby, ready, and calls nothing.
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    labels = spec["template"]["metadata"]["labels"]
    pdb = only(ha_objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # The state is in PostgreSQL: no claim, no state volume, nothing mounted for it.
    assert not [k for k in ha_objects if k[0] == "PersistentVolumeClaim"]
    pod = spec["template"]["spec"]
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    mounts = {m["mountPath"] for m in container(pod, "reconciler")["volumeMounts"]}
    assert mounts == {"/git", "/tmp"}
    # A standby answers /readyz 200 (a 503 would stall this rollout and every drain).
    probe = container(pod, "reconciler")["readinessProbe"]["httpGet"]
    assert probe["path"] == "/readyz" and "/readyz" in health_routes()
    assert ("Service", "reconciler") in ha_objects


def test_two_replicas_keep_the_network_policy(
    ha_objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    policy = only(ha_objects, "NetworkPolicy")
    labels = only(ha_objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()


def test_two_replicas_read_the_postgresql_url_from_a_secret(
    ha_objects: dict[tuple[str, str], dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from reconciler.store.base import PostgresURL

    pod = only(ha_objects, "Deployment")["spec"]["template"]["spec"]
    c = container(pod, "reconciler")
    env = {e["name"]: e for e in c["env"]}
    assert "value" not in env["RECONCILER_STATE"], "the URL holds a password: a Secret only"
    ref = env["RECONCILER_STATE"]["valueFrom"]["secretKeyRef"]
    url = ha_objects[("Secret", ref["name"])]["stringData"][ref["key"]]
    assert env["RECONCILER_REPLICA"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    given = {**plain_env(c), "RECONCILER_STATE": url, "RECONCILER_REPLICA": "reconciler-7d9f-x2"}
    params = parse_invocation(list(c["args"]), given, monkeypatch)
    assert isinstance(params["state"], PostgresURL)
    assert "REPLACE-WITH-PASSWORD" not in str(params["state"])
    assert params["replica"] == "reconciler-7d9f-x2"
    assert params["health_host"] == "0.0.0.0"


def env_files() -> list[tuple[Path, tuple[str, ...]]]:
    """Each artefact and the commands its RECONCILER_* variables feed."""
    daemon = [
        DOCKERFILE,
        UNIT,
        ENV_EXAMPLE,
        *sorted(K8S.glob("*.yaml")),
        *sorted(K8S_HA.glob("*.yaml")),
    ]
    ci = sorted((DEPLOY / "ci").glob("*.y*ml"))
    return [(p, ("run",)) for p in daemon] + [(p, ("validate", "plan")) for p in ci]


@pytest.mark.parametrize(
    ("path", "commands"), env_files(), ids=lambda v: v.name if isinstance(v, Path) else None
)
def test_reconciler_variables_are_options(path: Path, commands: tuple[str, ...]) -> None:
    known = envvars(*commands)
    used = set(ENV_NAME.findall(path.read_text(encoding="utf-8")))
    unknown = used - known
    assert not unknown, f"{path.name}: {sorted(unknown)} are not options of {commands}"


def deprecated_envvars() -> dict[str, set[str]]:
    """Each old ``RECONCILER_*`` name that still works → the names replacing it."""
    assert isinstance(main, click.Group)
    renamed: dict[str, set[str]] = {}
    for cmd in (main, *main.commands.values()):
        for param in cmd.params:
            old = getattr(param, "deprecated_envvar", None)
            if old:
                assert isinstance(param.envvar, str)
                renamed.setdefault(old, set()).add(param.envvar)
    return renamed


def stale_names(text: str) -> dict[str, list[str]]:
    """Deprecated variables a text uses, with what replaces each."""
    old = deprecated_envvars()
    return {name: sorted(old[name]) for name in set(ENV_NAME.findall(text)) & old.keys()}


def test_deploy_files_use_no_deprecated_variable() -> None:
    assert stale_names("Environment=RECONCILER_PORT=8780 RECONCILER_STATE=/s.db") == {
        "RECONCILER_PORT": ["RECONCILER_EMULATOR_PORT"]
    }
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        stale = stale_names(path.read_text(encoding="utf-8"))
        assert not stale, f"{path.name} uses deprecated names; their replacements: {stale}"


def test_the_manual_lists_every_deprecated_variable_with_its_replacements() -> None:
    rows: dict[str, set[str]] = {}
    for line in (REPO / "docs" / "commands.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"\| `(RECONCILER_\w+)` \| (.*) \|$", line)
        if m:
            rows[m[1]] = set(ENV_NAME.findall(m[2]))
    assert rows == deprecated_envvars()


def test_an_unknown_variable_or_flag_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "RECONCILER_DRAIN_TIMEOUT" in envvars("run")
    assert "RECONCILER_DRAIN_TIMOUT" not in envvars("run")
    # Renamed variables still work but are no longer options' names, here or anywhere.
    assert deprecated_envvars()["RECONCILER_OUTPUT"] == {
        "RECONCILER_PLAN_OUTPUT",
        "RECONCILER_STATUS_OUTPUT",
    }
    assert deprecated_envvars()["RECONCILER_PORT"] == {"RECONCILER_EMULATOR_PORT"}
    assert "RECONCILER_OUTPUT" not in envvars("validate", "plan", "status", "emulator")
    assert "RECONCILER_PORT" not in envvars("run", "emulator")
    with pytest.raises(AssertionError, match="no option --helth-port"):
        parse_invocation(["run", "--helth-port=1", "/x"], {}, monkeypatch)
    with pytest.raises(click.BadParameter):
        parse_invocation(["run", "/x"], {"RECONCILER_HEALTH_PORT": "http"}, monkeypatch)


# --- Dockerfile -------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    name: str
    value: str


def dockerfile() -> list[Instruction]:
    """Instructions, continuation lines joined, comments dropped."""
    out: list[Instruction] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        name, _, value = full.partition(" ")
        out.append(Instruction(name.upper(), value.strip()))
    assert not pending, "Dockerfile ends inside a continuation"
    return out


def final_stage() -> list[Instruction]:
    instructions = dockerfile()
    last = max(i for i, ins in enumerate(instructions) if ins.name == "FROM")
    return instructions[last:]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in final_stage():
        if ins.name == "ENV":
            for token in shlex.split(ins.value):
                name, eq, value = token.partition("=")
                assert eq, f"ENV {token!r}: use the NAME=value form"
                env[name] = value
    return env


def single(name: str) -> str:
    found = [i.value for i in final_stage() if i.name == name]
    assert len(found) == 1, f"expected one {name}, found {found}"
    return found[0]


def dockerfile_uid() -> int:
    user = single("USER").split(":")[0]
    assert user.isdigit(), "USER must be a numeric uid so runAsNonRoot can verify it"
    return int(user)


def test_dockerfile_image_shape() -> None:
    assert all(i.value.split()[0] == "python:3.11-slim" for i in dockerfile() if i.name == "FROM")
    assert dockerfile_uid() >= 1000  # non-root, outside the system range
    assert json.loads(single("ENTRYPOINT")) == ["reconciler"]
    assert "reconciler" in PROJECT["scripts"]
    assert single("EXPOSE").split("/")[0] == str(run_default("health_port"))
    assert any("pip install ." in i.value for i in dockerfile() if i.name == "RUN")


def test_dockerfile_defaults_make_a_valid_run(monkeypatch: pytest.MonkeyPatch) -> None:
    env = dockerfile_env()
    params = parse_invocation(json.loads(single("CMD")), env, monkeypatch)
    assert params["health_host"] == "0.0.0.0"
    assert params["health_port"] == int(single("EXPOSE").split("/")[0])
    volumes = json.loads(single("VOLUME"))
    state = PurePosixPath(str(params["state"]))
    assert any(state.is_relative_to(v) for v in volumes), f"{state} is not on a VOLUME"
    assert single("WORKDIR") in volumes


def dockerfile_sources() -> set[str]:
    """What the build stage copies from the build context."""
    copied: set[str] = set()
    for ins in dockerfile():
        if ins.name == "COPY" and "--from=" not in ins.value:
            copied.update(shlex.split(ins.value)[:-1])
    return copied


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, "the ignore file is an allow-list"
    readme = PROJECT["readme"]
    copied = dockerfile_sources()
    assert copied >= {"pyproject.toml", "reconciler", readme}
    for source in copied:
        assert source in allowed, f"COPY {source} but the ignore file excludes it"
        assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_dockerfile_healthcheck_probes_a_real_health_server() -> None:
    healthcheck = single("HEALTHCHECK")
    _, _, cmd = healthcheck.partition("CMD ")
    argv = json.loads(cmd)
    assert argv[0] == "python"
    argv[0] = sys.executable
    port = free_port()
    env = {**os.environ, "RECONCILER_HEALTH_PORT": str(port)}

    async def check() -> int:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        return await asyncio.wait_for(proc.wait(), timeout=30)

    async def scenario() -> tuple[int, int]:
        server = HealthServer(metrics=Metrics(), readiness=lambda: "first reconcile")
        await server.start(host="127.0.0.1", port=port)
        try:
            up = await check()  # healthy even though not ready
        finally:
            await server.stop()
        return up, await check()

    up, down = asyncio.run(scenario())
    assert up == 0
    assert down != 0


# --- systemd ----------------------------------------------------------------------


def unit() -> dict[str, list[tuple[str, str]]]:
    """Sections of the unit as ordered (key, value) lists; keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None, f"{line!r} outside a section"
        assert not line.endswith("\\"), "keep unit lines unwrapped"
        key, eq, value = line.partition("=")
        assert eq, f"not a key=value line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def service_value(key: str) -> str:
    values = [v for k, v in unit()["Service"] if k == key]
    assert len(values) == 1, f"expected one {key}=, found {values}"
    return values[0]


def env_file_values(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            name, eq, value = line.partition("=")
            assert eq, f"{path.name}: not NAME=value: {line!r}"
            out[name] = value
    return out


def unit_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for key, value in unit()["Service"]:
        if key == "Environment":
            for token in shlex.split(value):
                name, _, val = token.partition("=")
                env[name] = val
    return env


def test_systemd_unit_runs_the_daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    argv = shlex.split(service_value("ExecStart"))
    assert PurePosixPath(argv[0]).name == "reconciler" and argv[1] == "run"
    example = env_file_values(ENV_EXAMPLE)
    params = parse_invocation(argv[1:], {**example, **unit_env()}, monkeypatch)
    state_dir = PurePosixPath("/var/lib") / service_value("StateDirectory")
    assert PurePosixPath(str(params["state"])).parent == state_dir
    assert str(params["directory"]).startswith("/srv/")
    assert service_value("KillSignal") == "SIGTERM"
    assert float(service_value("TimeoutStopSec")) > params["drain_timeout"]
    assert service_value("Restart") == "on-failure"
    assert service_value("EnvironmentFile").lstrip("-") == "/etc/reconciler/env"
    creds = load_credentials(environ=example, path=tmp_path / "absent")
    assert "REPLACE" in creds.access_key and "REPLACE" in creds.secret_key


def test_systemd_unit_is_hardened() -> None:
    service = dict(unit()["Service"])
    assert service.get("DynamicUser") == "yes" or service.get("User", "root") != "root"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert service.get(key) == value, key
    assert service.get("CapabilityBoundingSet") == ""
    assert "multi-user.target" in dict(unit()["Install"])["WantedBy"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    # verify insists that ExecStart's binary exists: point it at the installed script.
    script = Path(sys.executable).with_name("reconciler")
    if not script.exists():
        pytest.skip("the reconciler console script is not installed next to python")
    text = UNIT.read_text(encoding="utf-8").replace("/usr/local/bin/reconciler", str(script))
    copy = tmp_path / "reconciler.service"
    copy.write_text(text, encoding="utf-8")
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Unknown" not in proc.stderr and "Invalid" not in proc.stderr, proc.stderr


# --- CI workflow ------------------------------------------------------------------


def workflow() -> dict[str, Any]:
    doc: dict[Any, Any] = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    # YAML 1.1 reads a bare `on` key as True.
    if True in doc:
        doc["on"] = doc.pop(True)
    return doc


def plan_job() -> dict[str, Any]:
    job: dict[str, Any] = workflow()["jobs"]["plan"]
    return job


def step(step_id: str) -> dict[str, Any]:
    for s in plan_job()["steps"]:
        if s.get("id") == step_id:
            return dict(s)
    raise AssertionError(f"no step with id {step_id}")


def reconciler_lines(script: str) -> list[list[str]]:
    """The ``reconciler ...`` command lines of a script, up to any redirection."""
    out = []
    for line in script.splitlines():
        tokens = shlex.split(line, comments=True)
        if tokens and tokens[0] == "reconciler":
            stop = next(
                (i for i, t in enumerate(tokens) if t[:1] in "<>|&" or t[:2] in {"2>", "1>"}),
                len(tokens),
            )
            out.append(tokens[1:stop])
    return out


def test_workflow_checks_out_head_and_base_apart() -> None:
    wf = workflow()
    assert "pull_request" in wf["on"]
    checkouts = [
        s for s in plan_job()["steps"] if str(s.get("uses", "")).startswith("actions/checkout@")
    ]
    assert len(checkouts) == 2
    paths = [s["with"]["path"] for s in checkouts]
    assert len(set(paths)) == 2
    assert any("base" in str(s["with"].get("ref", "")) for s in checkouts)
    env = plan_job()["env"]
    assert {
        PurePosixPath(env["DESIRED"]).parts[0],
        PurePosixPath(env["BASE_DESIRED"]).parts[0],
    } == set(paths)


def expand(token: str, env: Mapping[str, str]) -> str:
    """Shell-style ``$NAME`` / ``${NAME}`` expansion from ``env`` only."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], token)


def test_workflow_commands_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: str(v) for k, v in plan_job()["env"].items()}
    commands: dict[str, list[str]] = {}
    for step_id in ("validate", "plan"):
        lines = reconciler_lines(step(step_id)["run"])
        assert len(lines) == 1, step_id
        # The plan step may swap in an empty base; the flag is what matters here.
        argv = [expand(t, {**env, "base": env["BASE_DESIRED"]}) for t in lines[0]]
        commands[step_id] = argv
        reconciler_env = {k: v for k, v in env.items() if k.startswith("RECONCILER_")}
        parse_invocation(argv, reconciler_env, monkeypatch)
    assert commands["validate"] == ["validate", env["DESIRED"]]
    plan = commands["plan"]
    assert plan[:2] == ["plan", env["DESIRED"]]
    assert plan[plan.index("--base") + 1] == env["BASE_DESIRED"]
    assert "--detailed-exitcode" in plan


@dataclass(frozen=True)
class StepRun:
    returncode: int
    stdout: str
    stderr: str
    summary: str
    outputs: str


class StepRunner:
    """Runs a workflow step's script with bash as GitHub does, against the real CLI."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.bindir = tmp_path / "bin"
        self.bindir.mkdir()
        shim = self.bindir / "reconciler"
        shim.write_text(
            f'#!/bin/sh\nexec "{sys.executable}" -m reconciler "$@"\n', encoding="utf-8"
        )
        shim.chmod(0o755)
        self.workspace = tmp_path / "workspace"
        self.workspace.mkdir()

    def __call__(self, step_id: str, env: Mapping[str, str] | None = None) -> StepRun:
        """``env``: what GitHub's ``${{ ... }}`` expressions would have given."""
        s = step(step_id)
        assert s.get("shell") == "bash", "say `shell: bash` to get -eo pipefail"
        summary, outputs = self.tmp / "summary.md", self.tmp / "outputs"
        summary.write_text("", encoding="utf-8")
        outputs.write_text("", encoding="utf-8")
        env = {
            "PATH": f"{self.bindir}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(self.tmp),
            "GITHUB_STEP_SUMMARY": str(summary),
            "GITHUB_OUTPUT": str(outputs),
            **{k: str(v) for k, v in plan_job().get("env", {}).items()},
            **{k: str(v) for k, v in s.get("env", {}).items()},
            **(env or {}),
        }
        script = self.tmp / f"{step_id}.sh"
        script.write_text(s["run"], encoding="utf-8")
        # GitHub runs `shell: bash` as: bash --noprofile --norc -eo pipefail {0}
        proc = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
            cwd=self.workspace,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return StepRun(
            proc.returncode,
            proc.stdout,
            proc.stderr,
            summary.read_text(encoding="utf-8"),
            outputs.read_text(encoding="utf-8"),
        )


@pytest.fixture
def run_step(tmp_path: Path) -> StepRunner:
    return StepRunner(tmp_path)


def tree(root: Path, *, duration: int) -> None:
    write(
        root,
        "lectures.yaml",
        tasks_yaml(APP, [{"RoomId": "r1", "TaskId": "seg", "Duration": duration}]),
    )


def test_workflow_passes_with_pending_calls_and_shows_the_plan(run_step: StepRunner) -> None:
    work = run_step.workspace
    tree(work / "pr" / "desired", duration=30)
    tree(work / "base" / "desired", duration=20)
    assert run_step("validate").returncode == 0
    result = run_step("plan")
    assert result.returncode == 0, result.stderr
    assert "calls_pending=true" in result.outputs
    assert "UpdateSegment" in result.summary and "20 → 30" in result.summary
    assert "UpdateSegment" in result.stdout  # the plan is in the job log too


def test_workflow_passes_without_calls(run_step: StepRunner) -> None:
    work = run_step.workspace
    tree(work / "pr" / "desired", duration=30)
    tree(work / "base" / "desired", duration=30)
    result = run_step("plan")
    assert result.returncode == 0, result.stderr
    assert "calls_pending=false" in result.outputs
    assert "sends nothing" in result.summary


def test_workflow_plans_everything_when_the_base_has_no_tree(run_step: StepRunner) -> None:
    work = run_step.workspace
    tree(work / "pr" / "desired", duration=30)
    result = run_step("plan")
    assert result.returncode == 0, result.stderr
    assert "calls_pending=true" in result.outputs
    assert "Duration" in result.summary


def test_workflow_posts_the_markdown_plan_on_the_pull_request(run_step: StepRunner) -> None:
    """The comment step's plan is real; ``gh`` (GitHub's CLI, which needs GitHub) is a
    script that records what it was asked to post, and fails the first ``--edit-last``
    as gh does when the workflow has not commented yet."""
    work = run_step.workspace
    tree(work / "pr" / "desired", duration=30)
    tree(work / "base" / "desired", duration=20)
    log = run_step.tmp / "gh.log"
    gh = run_step.bindir / "gh"
    gh.write_text(
        "#!/bin/bash\n"
        f'echo "$*" >> "{log}"\n'
        'for a in "$@"; do [ "$a" = --edit-last ] && exit 1; done\n'
        'while [ "$1" != --body-file ]; do shift; done\n'
        f'cp "$2" "{run_step.tmp}/posted.md"\n',
        encoding="utf-8",
    )
    gh.chmod(0o755)
    comment = step("comment")
    assert comment["if"] == "steps.plan.outcome == 'success'"
    assert comment["env"]["PR"] == "${{ github.event.pull_request.number }}"
    assert "pull-requests" in workflow()["permissions"]
    assert workflow()["on"]["pull_request"]["paths"] == ["desired/**"]
    result = run_step("comment", {"PR": "42", "GITHUB_REPOSITORY": "org/config", "GH_TOKEN": "t"})
    assert result.returncode == 0, result.stderr
    calls = log.read_text(encoding="utf-8").splitlines()
    assert calls == [
        "pr comment 42 --repo org/config --body-file plan.md --edit-last",
        "pr comment 42 --repo org/config --body-file plan.md",
    ]
    posted = (run_step.tmp / "posted.md").read_text(encoding="utf-8")
    assert posted.startswith("### reconciler plan\n\n**1** to update (**1** cut a slice ✂)")
    assert f"| ✂ | {APP}/r1/seg | Duration 20 → 30 |" in posted


def test_workflow_fails_on_an_invalid_tree(run_step: StepRunner) -> None:
    work = run_step.workspace
    write(
        work / "pr" / "desired", "bad.yaml", f'AppId: "{APP}"\nRoomId: r1\nTaskId: s\nDuraton: 5\n'
    )
    tree(work / "base" / "desired", duration=30)
    validated = run_step("validate")
    assert validated.returncode == 1
    assert "invalid" in validated.summary and "Duration" in validated.summary
    planned = run_step("plan")
    assert planned.returncode == 1
    assert "calls_pending" not in planned.outputs


# --- installing: under this project's own name, from its own sources ---------------

# On the public package index, `reconciler` is an unrelated project (a DataFrame
# utility): an instruction to `pip install reconciler` installs someone else's code.
TAKEN_NAME = "reconciler"
PIP_INSTALL = re.compile(r"\bpip3?\s+install\b(?P<args>[^`\n]*)")
# "do not `pip install reconciler`" warns against it; that line may stay.
NEGATION = re.compile(r"\b(?:not|never|don't)\b", re.IGNORECASE)
GIT_REQUIREMENT = re.compile(r"^(?P<name>[\w.\-]+) @ git\+https://\S+\.git@(?P<ref>[\w.\-/]+)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name() -> str:
    """The file `pip wheel` makes from this repository (its name is normalised to _)."""
    return f"{re.sub(r'[-_.]+', '_', PROJECT['name'])}-{PROJECT['version']}-py3-none-any.whl"


def pip_requirements(text: str) -> list[str]:
    """What the ``pip install`` commands of a text install (option values dropped)."""
    found: list[str] = []
    for line in text.splitlines():
        for m in PIP_INSTALL.finditer(line):
            if NEGATION.search(line[: m.start()]):
                continue
            tokens = shlex.split(m.group("args"), comments=True)
            tokens = tokens[
                : next((i for i, t in enumerate(tokens) if t in {"&&", "||", ";"}), None)
            ]
            found.extend(t for t in tokens if not t.startswith("-"))
    return found


def requirement_name(requirement: str) -> str:
    return canonical(re.split(r"[\s\[=<>!~;@]", requirement, maxsplit=1)[0])


def install_texts() -> list[Path]:
    """Every file that tells someone how to install: the README, the manual and the deploy files."""
    manual = sorted((REPO / "docs").glob("*.md"))
    return [REPO / "README.md", *manual, *sorted(p for p in DEPLOY.rglob("*") if p.is_file())]


def test_the_distribution_is_not_named_like_the_unrelated_project() -> None:
    assert canonical(PROJECT["name"]) != TAKEN_NAME
    # The command and the import package keep the short name.
    assert PROJECT["scripts"] == {"reconciler": "reconciler.cli.interrupt:main"}


def test_the_install_check_catches_the_taken_name() -> None:
    for line in (
        "pip install reconciler",
        "      run: pip install -U reconciler==0.1.0",
        '/opt/x/bin/pip install "reconciler @ git+https://git.example.com/o/r.git@v1"',
        "python3 -m venv /opt/r && /opt/r/bin/pip install reconciler",
    ):
        assert TAKEN_NAME in map(requirement_name, pip_requirements(line)), line
    for line in (
        "Do not `pip install reconciler`: that name is another project.",
        "pip install . && pip install --quiet --upgrade pip",
        f"pip install dist/{wheel_name()}",
    ):
        assert TAKEN_NAME not in map(requirement_name, pip_requirements(line)), line


def test_nothing_says_to_pip_install_the_taken_name() -> None:
    for path in install_texts():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            names = map(requirement_name, pip_requirements(line))
            assert TAKEN_NAME not in names, f"{path.relative_to(REPO)}:{n}: {line.strip()}"


def test_every_install_is_from_this_repository() -> None:
    """Each ``pip install`` is the source tree, its wheel, or a pinned git URL of it."""
    kinds: dict[str, set[str]] = {}
    for path in install_texts():
        for req in pip_requirements(path.read_text(encoding="utf-8")):
            rel = str(path.relative_to(REPO))
            if req == ".":
                kinds.setdefault(rel, set()).add("source")
            elif req.endswith(".whl"):
                assert PurePosixPath(req).name == wheel_name(), f"{rel}: {req}"
                kinds.setdefault(rel, set()).add("wheel")
            else:
                m = GIT_REQUIREMENT.match(req)
                assert m, f"{rel}: {req!r} is not `NAME @ git+https://...git@TAG`"
                assert canonical(m["name"]) == canonical(PROJECT["name"]), f"{rel}: {req}"
                kinds.setdefault(rel, set()).add("git")
    assert kinds["docs/deploying.md"] >= {"wheel", "git"}
    assert kinds["deploy/Dockerfile"] == {"source"}
    assert kinds["deploy/systemd/reconciler.service"] >= {"wheel"}
    install = next(s for s in plan_job()["steps"] if "pip install" in str(s.get("run", "")))
    # The config repository's CI has no checkout of this one: a pinned git URL.
    (req,) = pip_requirements(install["run"])
    assert GIT_REQUIREMENT.match(req), req
    manual = (REPO / "docs" / "deploying.md").read_text(encoding="utf-8")
    assert "python -m pip wheel --no-deps -w dist ." in manual
    assert re.search(r"[Dd]o not `pip install reconciler`", manual)


@pytest.mark.build
def test_wheel_builds_from_the_image_sources_under_the_project_name(tmp_path: Path) -> None:
    """The files the image build gets make a wheel named as the manual says.

    Offline: no build isolation and no index, so the venv's own setuptools and
    wheel build it (the dev extras install them) and the test takes seconds.
    """
    src = tmp_path / "src"
    for name in dockerfile_sources():
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(source, src / name)
    dist = tmp_path / "dist"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index"),
            *("--no-build-isolation", "--check-build-dependencies", "--quiet"),
            *("-w", str(dist), str(src)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = dist.glob("*.whl")
    assert wheel.name == wheel_name()
    with zipfile.ZipFile(wheel) as zf:
        info = f"{wheel_name().split('-py3')[0]}.dist-info"
        metadata = zf.read(f"{info}/METADATA").decode()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        names = set(zf.namelist())
    assert f"Name: {PROJECT['name']}\n" in metadata
    assert "reconciler = reconciler.cli.interrupt:main" in entry_points
    assert {"reconciler/cli/app.py", "reconciler/__main__.py"} <= names


# --- make demo ---------------------------------------------------------------------


def make_demo_invocation(*make_args: str) -> list[str]:
    """The ``reconciler`` command line ``make demo`` runs (``make -n``: nothing runs)."""
    proc = subprocess.run(
        ["make", "--no-print-directory", "-n", "-C", str(REPO), "demo", *make_args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = [shlex.split(line) for line in proc.stdout.splitlines() if " run " in line]
    assert len(lines) == 1, proc.stdout
    argv = lines[0]
    assert PurePosixPath(argv[0]).name == "reconciler", argv
    return argv[1:]


def test_make_demo_runs_the_daemon_on_the_documented_ports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    argv = make_demo_invocation()
    params = parse_invocation(argv, {}, monkeypatch)
    assert str(params["directory"]) == "desired" and params["embedded"] is True
    assert (params["emulator_port"], params["health_port"]) == (8780, 9108)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "emulator on 8780" in readme and "metrics on 9108" in readme


def test_make_demo_passes_demo_args_to_the_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = make_demo_invocation()
    argv = make_demo_invocation("DEMO_ARGS=--health-port 9200 --emulator-port 8781")
    assert argv == [*plain, "--health-port", "9200", "--emulator-port", "8781"]
    params = parse_invocation(argv, {}, monkeypatch)
    assert (params["emulator_port"], params["health_port"]) == (8781, 9200)
