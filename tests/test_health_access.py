"""Who may read the daemon's dashboard and /metrics: the Host check and credentials.

The daemon runs as a subprocess with its embedded emulator; every request is
real HTTP on loopback, with the Host and Authorization headers a browser, a
DNS-rebinding page or Prometheus would send. The probes (/healthz, /readyz)
answer whatever they carry.
"""

from __future__ import annotations

import base64
from pathlib import Path

import httpx

from reconciler.serve.health import HealthAccess
from tests.conftest import run_cli, tasks_yaml, write
from tests.harness import DaemonProcess

APP = "661e4a7b9c0d1e2f"
TOKEN = "scrape-token-8f3a1c0e9d2b"
PASSWORD = "dash-pass-5e7b2a"
ALLOWED = "reconciler.monitoring.svc"
PAGES = ("/", "/task?app=a&room=r&task=t", "/metrics")
PROBES = ("/healthz", "/readyz")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def tree(root: Path) -> None:
    rows = [{"RoomId": f"hall-{i}", "TaskId": "seg", "Duration": 30} for i in range(3)]
    write(root / "desired", "a.yaml", tasks_yaml(APP, rows))


def test_a_foreign_host_is_refused_and_credentials_are_asked_but_probes_stay_open(
    tmp_path: Path,
) -> None:
    tree(tmp_path)
    (tmp_path / "token").write_text(f"{TOKEN}\n")
    (tmp_path / "users").write_text(f"# the dashboard's users\nops:{PASSWORD}\n")
    args = ("desired", "--emulator", "--emulator-port", "0", "--health-port", "0")
    access = ("--health-token-file", "token", "--health-basic-auth-file", "users")
    env = {"RECONCILER_HEALTH_ALLOWED_HOST": f"{ALLOWED} other.example"}
    with DaemonProcess(tmp_path, *args, "--state", "s.db", *access, env=env) as d:
        d.wait_ready()
        port = int(d.health_url.rsplit(":", 1)[1])

        def get(path: str, host: str | None = None, auth: str | None = None) -> httpx.Response:
            headers = {"Host": f"{host}:{port}"} if host else {}
            if auth:
                headers["Authorization"] = auth
            return httpx.get(f"http://127.0.0.1:{port}{path}", headers=headers, timeout=10)

        bearer = f"Bearer {TOKEN}"
        for path in PAGES:
            # A page of evil.example whose name now resolves to 127.0.0.1: refused first.
            rebound = get(path, "evil.example", bearer)
            assert rebound.status_code == 403 and "--health-allowed-host" in rebound.text
            asked = get(path)
            assert asked.status_code == 401, path
            assert asked.headers["WWW-Authenticate"] == 'Basic realm="reconciler"'
            assert get(path, auth="Bearer wrong-token").status_code == 401
            assert get(path, auth=basic("ops", "wrong")).status_code == 401
            assert get(path, auth=basic("nobody", PASSWORD)).status_code == 401
        for host in (None, "localhost", "127.0.0.1", ALLOWED, "OTHER.example."):
            assert get("/metrics", host, bearer).status_code == 200, host
        metrics = get("/metrics", auth=bearer)
        assert "reconciler_desired_tasks 3.0" in metrics.text
        page = get("/", auth=basic("ops", PASSWORD))
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert get("/task?app=a&room=r&task=t", auth=bearer).status_code == 404, "served"
        for path in PROBES:  # kubelet probes by the pod's IP, with no credentials
            assert get(path, "evil.example").status_code == 200, path
            assert get(path).status_code == 200, path
        assert d.stop() == 0
    log = d.log_path.read_text()
    assert TOKEN not in log and PASSWORD not in log


def test_without_credentials_only_the_host_is_checked(tmp_path: Path) -> None:
    tree(tmp_path)
    args = ("desired", "--emulator", "--emulator-port", "0", "--health-port", "0")
    with DaemonProcess(tmp_path, *args, "--state", "s.db") as d:
        d.wait_ready()
        port = int(d.health_url.rsplit(":", 1)[1])
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200
        assert httpx.get(f"{url}/", headers={"Host": f"localhost:{port}"}).status_code == 200
        foreign = httpx.get(f"{url}/", headers={"Host": f"attacker.example:{port}"}, timeout=10)
        assert foreign.status_code == 403
        assert httpx.get(f"{url}/metrics", headers={"Host": "attacker.example"}).status_code == 403
        assert d.stop() == 0


def test_a_token_or_users_file_that_holds_none_is_refused_at_start(tmp_path: Path) -> None:
    tree(tmp_path)
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "users").write_text(f"ops {PASSWORD}\n")
    args = ("run", "desired", "--emulator", "--health-port", "0", "--state", "s.db")
    for option, file, says in (
        ("--health-token-file", "empty", "empty: holds no token"),
        ("--health-basic-auth-file", "users", "users:1: not a user:password line"),
        ("--health-token-file", "missing", "'missing' does not exist"),
    ):
        r = run_cli(*args, option, file, cwd=tmp_path)
        assert r.returncode == 1, r.stderr
        (error,) = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
        assert f"Invalid value for '{option}'" in error and says in error, error
        assert PASSWORD not in r.stderr
    assert not (tmp_path / "s.db").exists()


def test_host_names_a_rebinding_cannot_use() -> None:
    access = HealthAccess(allowed_hosts=frozenset({ALLOWED}))
    for host in ("127.0.0.1:9108", "[::1]:9108", "10.1.2.3", "localhost", "app.localhost:1"):
        assert access.host_allowed(host, bound="127.0.0.1"), host
    assert access.host_allowed(f"{ALLOWED.upper()}.:9108", bound="0.0.0.0")
    assert access.host_allowed("box.lan:9108", bound="box.lan")
    for host in ("evil.example", "evil.example:9108", "localhost.evil.example", ""):
        assert not access.host_allowed(host, bound="127.0.0.1"), host
    assert HealthAccess(allowed_hosts=frozenset({"*"})).host_allowed("any.example", bound="x")
    assert "hunter2" not in repr(HealthAccess(tokens=("hunter2",), users={"u": "hunter2"}))
