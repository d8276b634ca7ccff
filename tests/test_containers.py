"""Containers: who a cgroup is (containers.py), and real OCI containers under runc.

The runc tests build a busybox rootfs here (no registry), write a runc spec with the
kubelet's layout (a pod-like parent with a QoS name, inside this run's own test parent:
/oomguard-test/c-<pid>-<ticks>/kubepods/burstable/pod<uid>/<container id>), a 64 MiB memory
limit and the Kubernetes annotations, start the containers detached (`runc run -d`) and
always take them down (runc kill/delete, then the groups in every v1 hierarchy). Containers
and groups a crashed run left are cleaned at the next run's start. The host's /usr is
bind-mounted read-only so the workloads' Python runs inside.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from oomguard.cgroup import cgroup_at
from oomguard.cgroup.transient import ensure_parent, owner_tag
from oomguard.containers import ContainerIdentity, ContainerIndex, parse_path
from oomguard.errors import ConfigError
from oomguard.journal import Journal
from oomguard.obs.log import DecisionLog
from oomguard.obs.metrics import Metrics
from oomguard.policy.load import parse_policy
from oomguard.steps.victims import is_namespace_init
from oomguard.workloads import LEAK, STEADY

from conftest import HIER, ROOT, TEST_PARENT, wait_until
from journal_helpers import incidents

MiB = 1 << 20
UID = "3c1f0a2e-1111-4222-8333-444455556666"
HEX = "9f2e" + "a" * 60


# -- the path alone -------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "runtime", "cid", "uid", "qos"), [
    # kubelet cgroupfs driver (v1 and v2 alike): kubepods/<qos>/pod<uid>/<id>
    (f"/kubepods/burstable/pod{UID}/{HEX}", "", HEX, UID, "burstable"),
    (f"/kubepods/besteffort/pod{UID}/crio-{HEX}", "cri-o", HEX, UID, "besteffort"),
    (f"/kubepods/pod{UID}/{HEX}", "", HEX, UID, "guaranteed"),
    (f"/kubepods/burstable/pod{UID}", "", "", UID, "burstable"),
    # kubelet systemd driver: nested slices, the UID's "-" escaped as "_"
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}"
     f".slice/cri-containerd-{HEX}.scope", "containerd", HEX, UID, "burstable"),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}"
     f".slice/crio-{HEX}.scope", "cri-o", HEX, UID, "besteffort"),
    (f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/docker-{HEX}.scope",
     "docker", HEX, UID, "guaranteed"),
    # outside Kubernetes
    (f"/system.slice/docker-{HEX}.scope", "docker", HEX, "", ""),
    (f"/docker/{HEX}", "docker", HEX, "", ""),
    (f"/machine.slice/libpod-{HEX}.scope", "podman", HEX, "", ""),
    (f"/machine.slice/libpod-{HEX}.scope/container", "podman", HEX, "", ""),
    (f"/libpod_parent/libpod-{HEX}", "podman", HEX, "", ""),
    # nested below a parent of its own (this suite's layout)
    (f"/oomguard-test/c-1-2/kubepods/burstable/pod{UID}/ctr-1", "", "ctr-1", UID, "burstable"),
])
def test_layouts(path: str, runtime: str, cid: str, uid: str, qos: str) -> None:
    found = parse_path(path)
    assert found is not None
    assert (found.runtime, found.id, found.pod_uid, found.qos) == (runtime, cid, uid, qos)


@pytest.mark.parametrize("path", [
    "/", "/user.slice", "/system.slice/ssh.service", "/kubepods", "/kubepods/burstable",
    "/kubepods.slice/kubepods-burstable.slice",
    f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-conmon-{HEX}.scope",
    f"/machine.slice/libpod-conmon-{HEX}.scope", "/oomguard-test/t-1-2-leak",
])
def test_not_containers(path: str) -> None:
    assert parse_path(path) is None


def _runc_state(root: Path, cid: str, labels: list[str]) -> None:
    d = root / "runc" / cid
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps({"id": cid, "config": {"labels": labels}}))


def test_names_from_runc_state_and_containerd_bundle(tmp_path: Path) -> None:
    _runc_state(tmp_path, "ctr-1", ["io.kubernetes.pod.name=web-7d9f",
                                    "io.kubernetes.pod.namespace=shop",
                                    "io.kubernetes.container.name=app", "bundle=/x"])
    bundle = tmp_path / "containerd/io.containerd.runtime.v2.task/k8s.io" / HEX
    bundle.mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps({"annotations": {
        "io.kubernetes.cri.sandbox-name": "db-0", "io.kubernetes.cri.sandbox-namespace": "data",
        "io.kubernetes.cri.container-name": "pg", "io.kubernetes.cri.container-type": "container",
    }}))
    index = ContainerIndex([str(tmp_path)])
    a = index.lookup(f"/kubepods/burstable/pod{UID}/ctr-1")
    assert a is not None and a.named and a.runtime == "runc"
    assert (a.namespace, a.pod, a.container) == ("shop", "web-7d9f", "app")
    assert a.label() == "shop/web-7d9f/app (burstable)"
    assert "bundle" not in a.annotations
    b = index.lookup(f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/"
                     f"cri-containerd-{HEX}.scope")
    assert b is not None and (b.namespace, b.pod, b.container, b.qos) == (
        "data", "db-0", "pg", "guaranteed")
    # not there yet (the runtime writes it after the cgroup): found on a refresh
    c = index.lookup(f"/kubepods/besteffort/pod{UID}/ctr-2")
    assert c is not None and not c.named and c.label().startswith("pod ")
    _runc_state(tmp_path, "ctr-2", ["io.kubernetes.container.name=late"])
    assert index.lookup(f"/kubepods/besteffort/pod{UID}/ctr-2") is c  # cached
    refreshed = index.refresh(f"/kubepods/besteffort/pod{UID}/ctr-2")
    assert refreshed is not None and refreshed.container == "late"


def test_hostile_metadata_is_bounded_and_escaped(tmp_path: Path) -> None:
    evil = "app\x1b[2J\nkilled pid 1 (init)" + "x" * 5000
    labels = [f"io.kubernetes.container.name={evil}", "io.kubernetes.pod.namespace=ns\r"]
    labels += [f"k{i}=v" for i in range(500)]
    _runc_state(tmp_path, "ctr-3", labels)
    found = ContainerIndex([str(tmp_path)]).lookup(f"/kubepods/pod{UID}/ctr-3")
    assert found is not None
    assert len(found.container) <= 63 and len(found.annotations) <= 64
    assert all(len(v) <= 256 for v in found.annotations.values())
    # a state file that is not a regular file, or too large, is not read
    link = tmp_path / "runc" / "ctr-4"
    link.mkdir()
    (link / "state.json").symlink_to(tmp_path / "runc" / "ctr-3" / "state.json")
    big = tmp_path / "runc" / "ctr-5"
    big.mkdir()
    (big / "state.json").write_text(" " * (2 << 20) + "{}")
    index = ContainerIndex([str(tmp_path)])
    for cid in ("ctr-4", "ctr-5", "../runc/ctr-3"):
        got = index.lookup(f"/kubepods/pod{UID}/{cid}")
        assert got is None or not got.named
    # the log: one line, the names escaped
    lines: list[str] = []

    class Sink:
        def write(self, s: str) -> None:
            lines.append(s)

        def flush(self) -> None:
            pass

    log = DecisionLog(Sink())  # type: ignore[arg-type]
    log.name_group("/k/c", found)
    log.killed(42, "leak", "/k/c", 10 * MiB, why="test")
    assert len("".join(lines).splitlines()) == 1 and "\x1b" not in lines[0]
    assert "\\x1b[2J\\nkilled pid 1" in lines[0]


def test_metric_labels_bounded() -> None:
    m = Metrics()
    for i in range(1100):
        ident = ContainerIdentity(namespace="ns", pod=f"web-{i}", container="app", named=True)
        m.name_cgroup(f"/g{i}", ident)
        m.victim(f"/g{i}")
        m.forget_cgroup(f"/g{i}")
    text = m.render()
    assert text.count("oomguard_container_victims_total{") == 1001  # 1000 + "_other"
    assert 'oomguard_container_victims_total{namespace="_other",pod="",container=""} 100' in text
    assert "oomguard_cgroup_container_info{" not in text  # forgotten with their groups


def test_policy_container_keys() -> None:
    policy = parse_policy("""
[[rule]]
name = "besteffort"
match = "/kubepods/**"
qos = "besteffort"

[[rule]]
name = "shop"
match = "/kubepods/**"
namespace = ["shop", "shop-*"]
container = "app"
annotations = {"io.kubernetes.pod.name" = "web-*"}
avoid = [{container_init = true}]

[[rule]]
name = "rest"
match = "/kubepods/**"
""", "t.toml")
    path = f"/kubepods/burstable/pod{UID}/{HEX}"
    shop = ContainerIdentity(id=HEX, pod_uid=UID, qos="burstable", namespace="shop-eu",
                             pod="web-1", container="app", named=True,
                             annotations={"io.kubernetes.pod.name": "web-1"})
    assert policy.speaks_containers
    assert policy.rule_for(path, shop).name == "shop"  # type: ignore[union-attr]
    other = ContainerIdentity(id=HEX, pod_uid=UID, qos="burstable", namespace="shop",
                              pod="db-1", container="app", named=True,
                              annotations={"io.kubernetes.pod.name": "db-1"})
    assert policy.rule_for(path, other).name == "rest"  # type: ignore[union-attr]
    best = ContainerIdentity(id=HEX, pod_uid=UID, qos="besteffort")
    assert policy.rule_for(path, best).name == "besteffort"  # type: ignore[union-attr]
    assert policy.rule_for(path, None).name == "rest"  # type: ignore[union-attr]
    assert policy.rules[1].avoid[0].container_init is True
    with pytest.raises(ConfigError) as err:
        parse_policy('[[rule]]\nmatch = "/**"\nqos = "bestefort"\nnamespace = []\n', "t.toml")
    assert "did you mean 'besteffort'" in str(err.value)
    assert "key 'namespace'" in str(err.value)


def test_example_kubernetes_policy_loads() -> None:
    from oomguard.policy.load import load_policy

    policy = load_policy(Path(__file__).resolve().parents[1] / "examples/kubernetes.toml")
    names = [r.name for r in policy.rules]
    assert names.index("besteffort") < names.index("burstable") < names.index("guaranteed")


def test_namespace_init_from_status() -> None:
    assert is_namespace_init(b"Name:\tx\nNSpid:\t4242\t1\nNSsid:\t0\n")
    assert not is_namespace_init(b"Name:\tx\nNSpid:\t4242\t7\n")
    assert not is_namespace_init(b"Name:\tinit\nNSpid:\t1\n")  # the host's own init
    assert not is_namespace_init(b"Name:\tx\n")


# -- real containers under runc ---------------------------------------------------------------

RUNC = shutil.which("runc")
BUSYBOX = shutil.which("busybox")
PYTHON = "/usr/bin/python3"  # the host's, from the read-only /usr bind mount
ID_PREFIX = "oomguard-test-"
RUNC_ROOT = Path("/run/runc")

needs_runc = pytest.mark.skipif(
    HIER is None or not ROOT or RUNC is None or BUSYBOX is None or not Path(PYTHON).exists(),
    reason="needs root, a memory cgroup controller, runc and busybox (scripts/test installs "
           "runc and busybox-static) and /usr/bin/python3")


def _cgroup_mounts() -> list[Path]:
    """Every cgroup hierarchy's mount point: runc makes the container's path in each."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ")[0] in ("cgroup", "cgroup2"):
            out.append(Path(left.split(" ")[4]))
    return out


def _alive(tag: str) -> bool:
    """Is the run named <pid>-<start ticks> still running?"""
    from oomguard.procs import read_stat

    pid, _, ticks = tag.partition("-")
    try:
        return read_stat(int(pid)).start_ticks == int(ticks)
    except Exception:
        return False


def _runc(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    assert RUNC is not None
    return subprocess.run([RUNC, *args], capture_output=True, text=True, timeout=timeout,
                          check=check, stdin=subprocess.DEVNULL)


def _remove_tree(top: Path) -> None:
    """rmdir a cgroup directory tree, deepest first (its tasks are gone by now)."""
    if not top.is_dir():
        return
    for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda e: -len(e[0])):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass


def _delete_container(cid: str) -> None:
    _runc("kill", cid, "KILL", check=False)
    for _ in range(50):
        if _runc("delete", "--force", cid, check=False).returncode == 0:
            return
        time.sleep(0.1)


def _clean_stale() -> None:
    """What a crashed run left: its containers (runc state), then its groups everywhere."""
    if RUNC_ROOT.is_dir():
        for entry in RUNC_ROOT.iterdir():
            m = re.fullmatch(re.escape(ID_PREFIX) + r"(\d+-\d+)-.*", entry.name)
            if m and not _alive(m.group(1)):
                _delete_container(entry.name)
    for mount in _cgroup_mounts():
        parent = mount / TEST_PARENT.strip("/")
        if parent.is_dir():
            for child in parent.iterdir():
                m = re.fullmatch(r"c-(\d+-\d+)", child.name)
                if m and child.is_dir() and not _alive(m.group(1)):
                    _remove_tree(child)


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox rootfs built here: /bin/sh and friends, and mount points for /usr."""
    assert BUSYBOX is not None
    root = tmp_path_factory.mktemp("rootfs")
    for d in ("bin", "usr", "proc", "dev", "sys", "tmp", "etc"):
        (root / d).mkdir()
    shutil.copy2(os.path.realpath(BUSYBOX), root / "bin/busybox")
    for applet in ("sh", "sleep", "cat", "ps"):
        (root / "bin" / applet).symlink_to("busybox")
    for link in ("lib", "lib64"):  # merged /usr (Debian 12): the loader is under /usr
        if Path(f"/{link}").is_symlink():
            (root / link).symlink_to(os.readlink(f"/{link}").lstrip("/"))
    os.chmod(root, 0o755)
    return root


@dataclass
class Container:
    id: str
    relpath: str  # its memory cgroup, relative to the mount
    bundle: Path

    @property
    def init_pid(self) -> int:
        state = json.loads(_runc("state", self.id).stdout)
        return int(state["pid"])

    def pids(self, memory_mount: Path) -> list[int]:
        procs = memory_mount / self.relpath.lstrip("/") / "cgroup.procs"
        try:
            return [int(p) for p in procs.read_text().split()]
        except OSError:
            return []


@dataclass
class Pod:
    """A pod-like parent: /oomguard-test/c-<tag>/kubepods/<qos>/pod<uid>."""

    base: str  # /oomguard-test/c-<tag>
    relpath: str
    uid: str
    start: Callable[..., Container]
    go: Path  # a file here (seen as /go/go inside) lets a container started by `waiting` go on

    def waiting(self, args: list[str]) -> list[str]:
        """args run once the test creates `go`/go, as the container's PID 1 (exec)."""
        quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in args)
        return ["/bin/sh", "-c", f"while [ ! -e /go/go ]; do sleep 0.05; done; exec {quoted}"]

    def release(self) -> None:
        (self.go / "go").write_text("go")


@pytest.fixture
def pod(rootfs: Path, tmp_path: Path) -> Iterator[Pod]:
    assert HIER is not None and HIER.memory is not None
    _clean_stale()
    ensure_parent(HIER, TEST_PARENT)
    tag = owner_tag()
    base = f"{TEST_PARENT}/c-{tag}"
    uid = str(uuid.uuid4())
    relpath = f"{base}/kubepods/burstable/pod{uid}"
    # The QoS parent exists before the daemon starts (as the kubelet's does on a node).
    (HIER.memory.mount_point / relpath.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    started: list[Container] = []
    go = tmp_path / "go"
    go.mkdir()

    def start(name: str, args: list[str], *, pod_name: str = "web-1",
              namespace: str = "shop") -> Container:
        cid = f"{ID_PREFIX}{tag}-{name}"
        bundle = tmp_path / name
        bundle.mkdir()
        _runc("spec", "--bundle", str(bundle))
        spec = json.loads((bundle / "config.json").read_text())
        spec["root"] = {"path": str(rootfs), "readonly": True}
        spec["process"].update(terminal=False, args=args, cwd="/",
                               env=["PATH=/bin:/usr/bin", "PYTHONDONTWRITEBYTECODE=1"])
        spec["mounts"].append({"destination": "/usr", "type": "bind", "source": "/usr",
                               "options": ["rbind", "ro"]})
        # /go: where the test says "start now" (a file appears) to a container that waits
        spec["mounts"].append({"destination": "/go", "type": "bind", "source": str(go),
                               "options": ["rbind", "ro"]})
        linux = spec["linux"]
        linux["namespaces"] = [n for n in linux["namespaces"] if n["type"] != "network"]
        linux["cgroupsPath"] = f"{relpath}/{cid}"
        linux["resources"] = {"memory": {"limit": 64 * MiB, "swap": 64 * MiB}}
        spec["annotations"] = {
            "io.kubernetes.pod.name": pod_name, "io.kubernetes.pod.namespace": namespace,
            "io.kubernetes.container.name": name, "io.kubernetes.pod.uid": uid,
            "io.kubernetes.cri.container-type": "container",
        }
        (bundle / "config.json").write_text(json.dumps(spec))
        container = Container(cid, f"{relpath}/{cid}", bundle)
        started.append(container)
        # The container's stdio: a file (a pipe would keep `runc run -d` from returning).
        with open(bundle / "output", "wb") as out:
            r = subprocess.run([str(RUNC), "run", "--detach", "--bundle", str(bundle), cid],
                               stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=30)
        assert r.returncode == 0, f"runc run: {(bundle / 'output').read_text()}"
        # Its limit, before anything in it allocates. A daemon may hold it already: on v2
        # that is memory.high at the limit and memory.max a headroom above (unheld_limit).
        group = cgroup_at(HIER, container.relpath)
        assert group.unheld_limit() == 64 * MiB
        return container

    try:
        yield Pod(base, relpath, uid, start, go)
    finally:
        for c in started:
            _delete_container(c.id)
        for mount in _cgroup_mounts():
            _remove_tree(mount / base.lstrip("/"))
        leftover = [m for m in _cgroup_mounts() if (m / base.lstrip("/")).exists()]
        assert not leftover, f"groups left behind in {leftover}"


def _policy(base: str, body: str) -> str:
    return (f'[[rule]]\nname = "shop-burstable"\nmatch = "{base}/kubepods/**"\n'
            f'namespace = "shop"\nqos = ["burstable"]\ncontainer = "*"\n{body}\n')


def _scrape(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie its container's PID 1 has not reaped yet."""
    from conftest import task_state

    try:
        return task_state(pid) in ("Z", "X")
    except OSError:
        return True


@needs_runc
@pytest.mark.scenario  # both backends: the VM suite runs it on v2
def test_leaker_container_handled_steady_container_untouched(pod: Pod, run_daemon) -> None:
    assert HIER is not None and HIER.memory is not None
    mount = HIER.memory.mount_point
    steady = pod.start("steady", [PYTHON, "-c", STEADY, str(8 * MiB)])
    wait_until(lambda: len(steady.pids(mount)) == 1, what="the steady container's process")
    steady_pid = steady.init_pid
    d = run_daemon(_policy(pod.base, 'steps = ["hold", "snapshot", "kill"]\ngrace = "500ms"\n'
                                     'settle = "200ms"'), "--metrics", "127.0.0.1:0",
                   "--log-format", "json")
    d.wait_for("serving metrics at")
    url = re.search(r'serving metrics at (http://[^\s"\\]+)', d.log).group(1)  # type: ignore[union-attr]
    # Started after the daemon, into the watched pod: adopted once runc wrote its state
    # (50-250 ms after the cgroup here). It waits for that before it leaks: an OOM before
    # the names are known would be the kernel's (the rule asks for them).
    leaker = pod.start("leaker", pod.waiting([PYTHON, "-c", LEAK, str(MiB)]))
    d.wait_for(f"adopted {leaker.relpath}")
    pod.release()
    wait_until(lambda: "python" in Path(f"/proc/{leaker.init_pid}/cmdline").read_text(),
               what="the leaker's exec")
    leaker_pid = leaker.init_pid
    wait_until(lambda: any(i.closed_at for i in incidents(d.journal)), 60,
               what=f"an incident to close; log:\n{d.log}")
    inc = next(i for i in incidents(d.journal) if i.closed_at)
    assert inc.cgroup == leaker.relpath
    assert inc.container is not None
    assert (inc.container.namespace, inc.container.pod, inc.container.container,
            inc.container.qos, inc.container.pod_uid) == ("shop", "web-1", "leaker",
                                                          "burstable", pod.uid)
    assert inc.container.runtime == "runc" and inc.container.id == leaker.id
    assert [v.pid for v in inc.victims] == [leaker_pid]
    wait_until(lambda: _gone(leaker_pid), 10, what="the leaker to exit")
    assert not _gone(steady_pid), "the steady container's process was touched"
    assert steady.pids(mount) == [steady_pid]
    # the log names the container and the pod
    killed = [json.loads(line) for line in d.lines if '"event": "killed"' in line]
    assert killed and killed[0]["pid"] == leaker_pid
    assert killed[0]["container"]["pod"] == "web-1"
    assert killed[0]["container"]["namespace"] == "shop"
    assert killed[0]["container"]["container"] == "leaker"
    assert "[shop/web-1/leaker (burstable)]" in killed[0]["msg"]
    # the metrics: by namespace, pod and container
    wait_until(lambda: "oomguard_container_victims_total{" in _scrape(url), 10,
               what="the container's victim in the metrics")
    text = _scrape(url)
    assert ('oomguard_container_victims_total{namespace="shop",pod="web-1",container="leaker"} 1'
            in text)
    assert re.search(r'oomguard_cgroup_container_info\{cgroup="[^"]*steady",namespace="shop",'
                     r'pod="web-1",container="steady",qos="burstable"\} 1', text)
    # show and status name it too
    show = subprocess.run([*_oomguard(), "show", str(inc.id), "--journal", str(d.journal)],
                          capture_output=True, text=True, timeout=30)
    assert "container  shop/web-1/leaker (burstable)" in show.stdout, show.stdout + show.stderr
    status = subprocess.run([*_oomguard(), "status", steady.relpath], capture_output=True,
                            text=True, timeout=30)
    assert "shop/web-1/steady (burstable)" in status.stdout, status.stdout + status.stderr
    assert d.stop() == 0


def _oomguard() -> list[str]:
    import sys

    return [sys.executable, "-m", "oomguard"]


# PID 1 takes SIZE bytes, starts a leaking child, and sleeps: the biggest process of its
# container, which `largest` would choose; the policy keeps it for last.
PARENT = r"""
import subprocess, sys, time
size = int(sys.argv[1])
b = bytearray(size)
b[::4096] = b"\x01" * (size // 4096)
child = subprocess.Popen([sys.executable, "-c", sys.argv[2], str(1 << 20)])
print("ready", child.pid, flush=True)
while True:
    time.sleep(3600)
"""


@needs_runc
@pytest.mark.scenario
def test_two_processes_in_one_container_keep_pid_1(pod: Pod, run_daemon) -> None:
    assert HIER is not None and HIER.memory is not None
    mount = HIER.memory.mount_point
    d = run_daemon(_policy(pod.base, 'steps = ["hold", "snapshot", "kill"]\n'
                                     'strategy = "largest"\ngrace = "500ms"\n'
                                     'settle = "200ms"\navoid = [{container_init = true}]'))
    c = pod.start("app", pod.waiting([PYTHON, "-c", PARENT, str(30 * MiB), LEAK]))
    d.wait_for(f"adopted {c.relpath}")  # in a pod made after the daemon started
    pod.release()
    init = c.init_pid
    wait_until(lambda: any(i.closed_at for i in incidents(d.journal)), 60,
               what=f"an incident to close; log:\n{d.log}")
    inc = next(i for i in incidents(d.journal) if i.closed_at)
    assert inc.container is not None and inc.container.container == "app"
    assert len(inc.victims) == 1
    victim = inc.victims[0].pid
    assert victim != init, "the container's PID 1 was chosen"
    wait_until(lambda: _gone(victim), 10, what="the leaking child to exit")
    assert not _gone(init), "the container's PID 1 died"
    assert c.pids(mount) == [init]
    with Journal(d.journal) as j:
        step = next(s for s in j.incidents()[-1].steps if s.kind == "kill")
    assert "shop/web-1/app" in d.log
    assert step.result == "killed"
    # The cgroup was really the container's own, limited by runc (v2: held by the daemon
    # at memory.high, memory.max a headroom above; let go, memory.max is runc's again).
    assert cgroup_at(HIER, c.relpath).unheld_limit() == 64 * MiB
    assert d.stop() == 0
    assert cgroup_at(HIER, c.relpath).limit() == 64 * MiB


def test_desktop_notice_names_the_pod() -> None:
    from oomguard.containers import default_index
    from oomguard.steps.ask import _container

    path = f"/kubepods/besteffort/pod{UID}"
    assert _container(path) == ""  # nothing is read at the notice: only what adoption found
    default_index().lookup(path)  # what the engine does when it adopts the group
    assert _container(path) == f" (container pod {UID} (besteffort))"
    default_index().forget(path)
