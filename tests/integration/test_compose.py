"""The docker-compose stack as an operator meets it (run by `make compose-test`).

Skipped unless GATEWAY_URL points at the stack's gateway AND COMPOSE_PROJECT_DIR names the
directory holding docker-compose.yml. Also read:

  COMPOSE               compose command ("docker compose" or "docker-compose"; detected if unset)
  COMPOSE_PROJECT_NAME  the stack's project name (compose reads it too)
  GATEWAY_POLICY_DIR    the host directory mounted at /etc/gateway. The policy tests edit
                        rbac.yaml there with `sed -i` and restore it afterwards; they skip when
                        it is the repository itself, whose rbac.yaml is never modified.

Every wait polls a condition against a deadline; nothing sleeps for synchronization.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest

from tests.helpers import wait_until

GATEWAY_URL = os.environ.get("GATEWAY_URL", "")
PROJECT_DIR = os.environ.get("COMPOSE_PROJECT_DIR", "")

pytestmark = [
    pytest.mark.compose,
    pytest.mark.skipif(
        not (GATEWAY_URL and PROJECT_DIR),
        reason="needs the compose stack: GATEWAY_URL and COMPOSE_PROJECT_DIR (make compose-test)",
    ),
]

SALES = ("sales", "imsales")
MANAGER = ("manager", "imthemanager")
OPS = ("ops", "imtheops")
ITEMS = "/api/inventory"
T = TypeVar("T")

# What the gateway may answer while its upstream is away, besides success.
UPSTREAM_DOWN = {502, 503, 504}


# --- HTTP -----------------------------------------------------------------------------------


class Reply:
    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:200]!r}>"


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def call(
    method: str,
    path: str,
    auth: tuple[str, str] | None = None,
    body: Any = None,
    timeout: float = 10.0,
) -> Reply:
    """One request on a fresh connection; connection failures come back as status 0."""
    url = urlsplit(GATEWAY_URL)
    headers = basic(*auth) if auth else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return Reply(resp.status, resp.read())
    except OSError as exc:
        return Reply(0, str(exc).encode())
    finally:
        conn.close()


def wait_for(
    what: str,
    probe: Callable[[], T],
    done: Callable[[T], bool],
    timeout: float = 60.0,
    interval: float = 0.2,
) -> T:
    """Call ``probe`` until ``done(result)`` or the deadline; fail with the last result."""
    last: list[T] = []

    def finished() -> bool:
        last[:] = [probe()]
        return done(last[0])

    wait_until(
        finished,
        timeout,
        interval,
        what=lambda: f"timed out after {timeout:.0f}s waiting for {what}; last: {last[0]!r}",
    )
    return last[0]


# --- compose / docker -----------------------------------------------------------------------


def compose_command() -> list[str]:
    configured = os.environ.get("COMPOSE")
    if configured:
        return shlex.split(configured)
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"]


def compose(
    *args: str, check: bool = True, timeout: float = 180.0
) -> subprocess.CompletedProcess[str]:
    cmd = [*compose_command(), "-f", str(Path(PROJECT_DIR) / "docker-compose.yml")]
    if os.environ.get("COMPOSE_PROJECT_NAME"):
        cmd += ["-p", os.environ["COMPOSE_PROJECT_NAME"]]
    proc = subprocess.run(
        [*cmd, *args], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def docker(*args: str) -> str:
    proc = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"docker {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def container_id(service: str) -> str:
    cid = compose("ps", "-q", service).stdout.strip()
    assert cid, f"no container for service {service}"
    return cid


def inspect(ref: str, kind: str = "container") -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(docker(kind, "inspect", ref))
    return data[0]


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def stack_is_ready() -> None:
    wait_for("the gateway to be ready", lambda: call("GET", "/-/ready"), lambda r: r.status == 200)


def status() -> dict[str, Any]:
    reply = call("GET", "/-/status", OPS)
    assert reply.status == 200, reply
    data: dict[str, Any] = reply.json()
    return data


def sales_status() -> int:
    return call("GET", ITEMS, SALES).status


def sighup_gateway() -> None:
    compose("kill", "-s", "SIGHUP", "gateway")


def replace_file(path: Path, data: bytes) -> None:
    """Write as an editor saving by rename does: a new inode under the old name."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    os.replace(tmp, path)


def sed_in_place(path: Path, *expressions: str) -> None:
    sed = shutil.which("sed")
    if sed is None:
        pytest.skip("sed not installed")
    args = [a for e in expressions for a in ("-e", e)]
    subprocess.run([sed, "-i", *args, str(path)], check=True, timeout=30)


@pytest.fixture
def policy_file() -> Iterator[Path]:
    """The stack's rbac.yaml (a copy); restored and reloaded after the test, whatever happens."""
    directory = os.environ.get("GATEWAY_POLICY_DIR")
    if not directory:
        pytest.skip("GATEWAY_POLICY_DIR is not set: don't know which policy the stack reads")
    path = Path(directory).resolve() / "rbac.yaml"
    if path.parent == Path(PROJECT_DIR).resolve():
        pytest.skip("the stack reads the repository's rbac.yaml, which tests never edit")
    original = path.read_bytes()
    original_sha = status()["sha256"]
    yield path
    if path.read_bytes() != original:
        replace_file(path, original)
    sighup_gateway()
    wait_for(
        "the original policy to be back", lambda: status()["sha256"], lambda s: s == original_sha
    )
    wait_for("sales to read again", sales_status, lambda s: s == 200)


# --- the backend is reachable only through the gateway --------------------------------------


def test_backend_publishes_no_port_and_is_only_on_internal_networks() -> None:
    backend = inspect(container_id("backend"))
    assert not backend["HostConfig"].get("PortBindings"), backend["HostConfig"]["PortBindings"]
    published = {k: v for k, v in (backend["NetworkSettings"].get("Ports") or {}).items() if v}
    assert published == {}
    assert compose("port", "backend", "8081", check=False).stdout.strip() == ""
    networks = backend["NetworkSettings"]["Networks"]
    assert networks
    for name in networks:
        assert inspect(name, "network")["Internal"] is True, f"backend is on non-internal {name}"


def test_gateway_is_published_where_gateway_url_points() -> None:
    gateway = inspect(container_id("gateway"))
    bindings = gateway["NetworkSettings"]["Ports"]["8080/tcp"]
    url = urlsplit(GATEWAY_URL)
    assert {(b["HostIp"], int(b["HostPort"])) for b in bindings} == {(url.hostname, url.port)}
    kinds = {
        name: inspect(name, "network")["Internal"]
        for name in gateway["NetworkSettings"]["Networks"]
    }
    assert sorted(kinds.values()) == [False, True], (
        "gateway must join the internal and a public network"
    )


def test_containers_run_non_root_on_a_read_only_root() -> None:
    for service in ("gateway", "backend"):
        c = inspect(container_id(service))
        assert c["Config"]["User"].split(":")[0] not in ("", "0", "root"), service
        assert c["HostConfig"]["ReadonlyRootfs"] is True, service


def test_policy_is_a_read_only_directory_mount() -> None:
    mounts = {m["Destination"]: m for m in inspect(container_id("gateway"))["Mounts"]}
    policy = mounts["/etc/gateway"]
    assert policy["Type"] == "bind"
    assert policy["RW"] is False
    assert "/etc/gateway/rbac.yaml" not in mounts, "a single-file mount misses sed -i edits"


# --- reloading the policy from the host -----------------------------------------------------


def test_sighup_reaches_the_gateway_process() -> None:
    # An unchanged file is reloaded only on request (the watcher skips it), so the counter
    # moves only if the signal got through compose, tini and into the event loop.
    before = status()["reloads"]["unchanged"]
    sighup_gateway()
    wait_for("a SIGHUP reload", lambda: status()["reloads"]["unchanged"], lambda n: n > before)


def test_sed_edit_on_the_host_revokes_and_restores_sales_reads(policy_file: Path) -> None:
    assert sales_status() == 200
    original = policy_file.read_bytes()
    inode = policy_file.stat().st_ino
    # Take the sales role away from user sales, and update the policy's own tests to match.
    sed_in_place(
        policy_file,
        r"/^  sales: *{/s/roles: \[sales\]/roles: []/",
        r"/user: sales, *method: *\(GET\|HEAD\),/s/expect: allow/expect: deny/",
    )
    assert policy_file.read_bytes() != original, "the sed edit matched nothing in rbac.yaml"
    assert policy_file.stat().st_ino != inode, "sed -i should have replaced the file"
    sighup_gateway()
    wait_for("sales to be refused", sales_status, lambda s: s == 403)
    assert call("GET", ITEMS, MANAGER).status == 200

    replace_file(policy_file, original)
    sighup_gateway()
    wait_for("sales to read again", sales_status, lambda s: s == 200)


def test_broken_edit_is_refused_and_the_old_policy_stays(policy_file: Path) -> None:
    before = status()
    # Revoke without updating the policy's tests: the reload must refuse it.
    sed_in_place(policy_file, r"/^  sales: *{/s/roles: \[sales\]/roles: []/")
    sighup_gateway()
    after = wait_for(
        "the reload to be refused",
        status,
        lambda s: s["reloads"]["failed"] > before["reloads"]["failed"],
    )
    assert after["sha256"] == before["sha256"]
    assert after["last_reload_error"]
    assert sales_status() == 200


# --- the backend goes away and comes back ---------------------------------------------------


def create_item() -> str:
    name = f"compose-{uuid.uuid4().hex[:12]}"
    reply = call("POST", ITEMS, MANAGER, body={"name": name, "count": 7})
    assert reply.status in (200, 201), reply
    return name


def item_is_there(name: str) -> None:
    reply = call("GET", f"{ITEMS}?name={name}", SALES)
    assert reply.status == 200, reply
    assert reply.json()["name"] == name and reply.json()["count"] == 7


def test_gateway_answers_502_while_backend_is_stopped_and_recovers(
    request: pytest.FixtureRequest,
) -> None:
    name = create_item()
    backend = container_id("backend")
    # Engine-level stop/start: compose v2 `stop SERVICE` may also stop services depending on
    # it, depending on the version, and this test is about the gateway staying up.
    docker("stop", backend)
    request.addfinalizer(lambda: docker("start", backend))
    down = wait_for(
        "the gateway to report the upstream down",
        lambda: call("GET", ITEMS, SALES),
        lambda r: r.status in UPSTREAM_DOWN,
    )
    assert down.json()["status"] == down.status
    # /-/ready caches its upstream probe for a second: wait for it rather than race it.
    wait_for("/-/ready to say 503", lambda: call("GET", "/-/ready").status, lambda s: s == 503)
    assert call("GET", "/-/healthz").status == 200
    docker("start", backend)
    wait_for("the gateway to reach the backend again", sales_status, lambda s: s == 200)
    item_is_there(name)


def test_compose_restart_backend_recovers_by_itself_with_data_kept() -> None:
    name = create_item()
    seen: set[int] = set()
    restart = subprocess.Popen(
        [
            *compose_command(),
            "-f",
            str(Path(PROJECT_DIR) / "docker-compose.yml"),
            *(
                ["-p", os.environ["COMPOSE_PROJECT_NAME"]]
                if os.environ.get("COMPOSE_PROJECT_NAME")
                else []
            ),
            "restart",
            "backend",
        ],
        cwd=PROJECT_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while restart.poll() is None and time.monotonic() < deadline:
        seen.add(sales_status())
        time.sleep(0.05)  # pacing for the probe loop, not synchronization
    out, _ = restart.communicate(timeout=30)
    assert restart.returncode == 0, out
    wait_for("the gateway to recover", sales_status, lambda s: s == 200)
    assert seen <= {200} | UPSTREAM_DOWN, f"unexpected answers during the restart: {seen}"
    item_is_there(name)


def test_recreated_backend_container_keeps_items_on_the_named_volume() -> None:
    name = create_item()
    old = container_id("backend")
    compose("up", "-d", "--no-deps", "--force-recreate", "backend")
    new = container_id("backend")
    assert new != old
    mounts = {m["Destination"]: m for m in inspect(new)["Mounts"]}
    assert mounts["/data"]["Type"] == "volume"
    wait_for("the gateway to reach the new backend", sales_status, lambda s: s == 200, timeout=90)
    item_is_there(name)


def test_gateway_follows_the_backend_to_a_new_address(request: pytest.FixtureRequest) -> None:
    backend = container_id("backend")
    info = inspect(backend)
    ((network, endpoint),) = info["NetworkSettings"]["Networks"].items()
    old_ip = endpoint["IPAddress"]

    def heal() -> None:  # runs last: leave a gateway that reaches the backend for later tests
        if sales_status() != 200:
            compose("restart", "gateway")
            wait_for(
                "the gateway to be ready",
                lambda: call("GET", "/-/ready"),
                lambda r: r.status == 200,
            )

    request.addfinalizer(heal)
    docker("stop", backend)
    request.addfinalizer(lambda: docker("start", backend))
    # Take the address the backend had, so that it comes back with another one (as after a
    # recreate in a busier network); nothing else about the backend changes.
    squatter = docker(
        "run", "-d", "--network", network, "--entrypoint", "sleep", info["Config"]["Image"], "600"
    ).strip()
    request.addfinalizer(lambda: docker("rm", "-f", squatter))
    docker("start", backend)
    new_ip = inspect(backend)["NetworkSettings"]["Networks"][network]["IPAddress"]
    assert new_ip != old_ip
    wait_for(
        "the gateway to reach the backend at its new address",
        sales_status,
        lambda s: s == 200,
        timeout=30,
    )


def test_gateway_restart_is_ready_again_within_seconds() -> None:
    started = time.monotonic()
    compose("restart", "gateway")
    wait_for(
        "the gateway to be ready again",
        lambda: call("GET", "/-/ready"),
        lambda r: r.status == 200,
        timeout=30,
    )
    assert time.monotonic() - started < 30
    assert sales_status() == 200
