"""deploy/: the Kubernetes manifests and the daemon image.

The manifests are checked offline: every object against the Kubernetes OpenAPI schemas
that the `kubernetes-validate` package ships (strict: an unknown field fails), the
ServiceMonitor against tests/data/servicemonitor-v1.schema.json; then what the schemas
cannot say: the ConfigMap's policy loads and leaves oomguard's own pod alone, the pod is
not privileged, its capabilities are the systemd unit's, the probes and the scrape
configuration name the port the daemon serves.

The image is built for real (deploy/build-image.sh: podman, bases from Debian packages,
no container registry) and run with runc as the DaemonSet runs it: the host's PID
namespace and cgroupfs, the manifest's capabilities, args and memory limit; it serves its
readiness endpoint, locks its memory, and handles an OOM in a group on the host.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from oomguard import __version__
from oomguard.cgroup import MemoryCgroup
from oomguard.containers import ContainerIdentity, parse_path
from oomguard.policy import load_policy
from oomguard.workloads import LEAK, STEADY

from cli_helpers import oomguard
from conftest import REPO, Spawn, needs_memcg, wait_until
from journal_helpers import closed_incident, hold_released, steps_of

yaml = pytest.importorskip("yaml", reason="PyYAML comes with the dev extra")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate comes with the dev extra")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with the dev extra")

MANIFESTS = REPO / "deploy" / "kubernetes"
UNIT = REPO / "packaging" / "systemd" / "oomguard.service"
SERVICEMONITOR_SCHEMA = Path(__file__).parent / "data" / "servicemonitor-v1.schema.json"
# The oldest Kubernetes the manifests promise to fit, and the newest the package knows.
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
# The unit's capabilities the pod does without: CAP_SETUID is for `ask` steps only (a
# user's session bus for a desktop notification), and a cluster node has no desktop.
NOT_IN_POD = {"CAP_SETUID"}
MiB = 1 << 20


# -- reading the manifests -------------------------------------------------------------------
def manifest_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")


def objects() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


def the(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in objects() if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects in {MANIFESTS}"
    return found[0]


def container() -> dict[str, Any]:
    containers = the("DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def policy_text() -> str:
    return str(the("ConfigMap")["data"]["policy.toml"])


def unit_capabilities() -> set[str]:
    line = next(ln for ln in UNIT.read_text().splitlines()
                if ln.startswith("CapabilityBoundingSet="))
    return set(line.split("=", 1)[1].split())


def validation_errors(doc: dict[str, Any], version: str) -> list[str]:
    """Every schema error of one object, as `path: message` lines (empty: valid)."""
    if doc.get("apiVersion") == "monitoring.coreos.com/v1":
        schema = json.loads(SERVICEMONITOR_SCHEMA.read_text())
        validator = jsonschema.Draft202012Validator(schema)
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in validator.iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"]
    return []


# -- the manifests -----------------------------------------------------------------------------
def test_every_manifest_is_listed_and_of_a_known_kind() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in manifest_files()]
    kinds = sorted(doc["kind"] for _, doc in objects())
    assert kinds == ["ConfigMap", "DaemonSet", "Namespace", "Service", "ServiceAccount",
                     "ServiceMonitor"]
    # No RBAC objects: the daemon has no Kubernetes API client and posts no Events.
    assert not {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"} & set(kinds)
    assert the("ServiceAccount")["automountServiceAccountToken"] is False
    namespaces = {doc["metadata"].get("namespace") for _, doc in objects()
                  if doc["kind"] != "Namespace"}
    assert namespaces == {the("Namespace")["metadata"]["name"]}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", [p.name for p in manifest_files()])
def test_manifest_validates_against_the_schema(name: str, version: str) -> None:
    docs = [d for n, d in objects() if n == name]
    assert docs
    for doc in docs:
        assert validation_errors(doc, version) == [], f"{name} ({doc['kind']})"


@pytest.mark.parametrize("kind,break_it", [
    ("DaemonSet", lambda d: d["spec"]["template"]["spec"].update(hostPid=True)),
    ("DaemonSet", lambda d: d["spec"]["template"]["spec"]["containers"][0]
     ["securityContext"]["capabilities"].update(add="KILL")),
    ("ConfigMap", lambda d: d["data"].update(count=3)),
    ("Service", lambda d: d["spec"]["ports"][0].update(port="metrics")),
    ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(interval="30 seconds")),
    ("ServiceMonitor", lambda d: d["spec"].update(endpoint=[])),
])
def test_the_schemas_catch_a_broken_manifest(kind: str, break_it: Any) -> None:
    """The validation is not vacuous: a misspelt field, a wrong type, a bad duration fail."""
    doc = json.loads(json.dumps(the(kind)))
    break_it(doc)
    assert validation_errors(doc, K8S_VERSIONS[0]) != []


def test_configmap_policy_passes_check(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text())
    done = oomguard("check", "--config", str(policy))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid" in done.stdout


def test_configmap_policy_is_the_example_less_guaranteed() -> None:
    """The ConfigMap carries examples/kubernetes.toml, less the rule for Guaranteed pods."""
    example = tomllib.loads((REPO / "examples" / "kubernetes.toml").read_text())
    shipped = tomllib.loads(policy_text())
    assert shipped["defaults"] == example["defaults"]
    dropped = [r for r in example["rule"] if r.get("qos") == "guaranteed"]
    assert len(dropped) == 1
    assert shipped["rule"] == [r for r in example["rule"] if r not in dropped]


def identity(relpath: str, namespace: str, pod: str, name: str) -> ContainerIdentity:
    """Who a group is, as the daemon learns it at adoption: the path, then the runtime's
    names."""
    found = parse_path(relpath)
    assert found is not None and found.qos, relpath
    return dataclasses.replace(found, namespace=namespace, pod=pod, container=name, named=True)


def test_configmap_policy_leaves_the_daemons_own_pod_alone(tmp_path: Path) -> None:
    """oomguard's pod is Guaranteed (requests == limits), and no rule may match it: the
    daemon would watch, and hold, the cgroup it runs in."""
    res = container()["resources"]
    assert res["requests"] == res["limits"]  # Guaranteed QoS
    assert set(res["limits"]) == {"cpu", "memory"}
    path = tmp_path / "policy.toml"
    path.write_text(policy_text())
    policy = load_policy(path)
    ns = the("DaemonSet")["metadata"]["namespace"]
    uid = "3c0e8c39-2a3b-4d4e-9f0a-1b2c3d4e5f60"
    ctr = "9f2e" * 16
    cgroupfs = f"/kubepods/pod{uid}"
    systemd = f"/kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice"
    own = {
        cgroupfs: ("", ""), f"{cgroupfs}/{ctr}": ("oomguard-x7k2p", "oomguard"),
        systemd: ("", ""),
        f"{systemd}/cri-containerd-{ctr}.scope": ("oomguard-x7k2p", "oomguard"),
    }
    for relpath, (pod, name) in own.items():
        me = identity(relpath, ns, pod, name)
        assert me.qos == "guaranteed"
        for p in ("/kubepods", "/kubepods.slice", relpath):
            assert policy.rule_for(p, me) is None, p
        assert policy.rule_for(relpath) is None  # as the daemon's start-up check asks
    # The rules the others get, by QoS class and namespace.
    burstable = f"/kubepods/burstable/pod{uid}/{ctr}"
    besteffort = (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
                  f"{uid.replace('-', '_')}.slice/cri-containerd-{ctr}.scope")
    cases = [
        (burstable, "shop", "burstable"),
        (besteffort, "shop", "besteffort"),
        (burstable, "kube-system", "kube-system"),
        (f"{cgroupfs}/{ctr}", "shop", None),  # Guaranteed: the kernel's, as without oomguard
    ]
    for relpath, namespace, want in cases:
        rule = policy.rule_for(relpath, identity(relpath, namespace, "web-7d9f", "app"))
        assert (rule.name if rule else None) == want, (relpath, namespace)


def test_not_privileged_and_capabilities_are_the_units() -> None:
    pod = the("DaemonSet")["spec"]["template"]["spec"]
    sc = container()["securityContext"]
    assert sc.get("privileged", False) is False
    assert sc["allowPrivilegeEscalation"] is False
    assert not pod.get("hostNetwork") and not pod.get("hostIPC")
    assert pod["hostPID"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    added = {"CAP_" + c for c in pod_capabilities()}
    assert added == unit_capabilities() - NOT_IN_POD
    assert unit_capabilities() >= NOT_IN_POD


def test_pod_layout() -> None:
    pod = the("DaemonSet")["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]  # every taint
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    cgroup = mounts["/sys/fs/cgroup"]
    assert not cgroup.get("readOnly", False)
    assert volumes[cgroup["name"]]["hostPath"]["path"] == "/sys/fs/cgroup"
    # The journal (and its intent log: what to put back after a crash) outlives the pod.
    state = mounts["/var/lib/oomguard"]
    assert volumes[state["name"]]["hostPath"]["path"] == "/var/lib/oomguard"
    # With hostPID the runtime's own /proc is the node's; runc refuses a mount over /proc.
    assert "/proc" not in mounts
    policy = mounts["/etc/oomguard"]
    assert volumes[policy["name"]]["configMap"]["name"] == the("ConfigMap")["metadata"]["name"]
    args = container()["args"]
    assert args[args.index("--config") + 1] == "/etc/oomguard/policy.toml"
    assert list(the("ConfigMap")["data"]) == ["policy.toml"]


def pod_capabilities() -> list[str]:
    return list(container()["securityContext"]["capabilities"]["add"])


def _host_capabilities() -> set[str]:
    """The capability names in this process's bounding set (CAP_KILL ...)."""
    names = ["CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
             "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
             "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
             "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
             "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
             "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
             "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE"]
    status = Path("/proc/self/status").read_text()
    bounding = int(re.search(r"^CapBnd:\s+([0-9a-f]+)", status, re.M).group(1), 16)  # type: ignore[union-attr]
    return {"CAP_" + n for i, n in enumerate(names) if bounding >> i & 1}


HOST_CAPS = _host_capabilities()


def metrics_port() -> int:
    args = container()["args"]
    host, _, port = args[args.index("--metrics") + 1].rpartition(":")
    assert host == "0.0.0.0"  # the pod IP: Prometheus and the kubelet's probes reach it
    return int(port)


def test_probes_and_scrape_name_the_metrics_port() -> None:
    """Every probe and the scrape configuration point at what `--metrics` serves."""
    c = container()
    port = metrics_port()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/metrics", probe  # the one path MetricsServer answers
        assert ports.get(get["port"], get["port"]) == port, probe
    notes = the("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == port
    assert notes["prometheus.io/path"] == "/metrics"
    service = the("Service")
    assert service["spec"]["clusterIP"] == "None"
    (sport,) = service["spec"]["ports"]
    assert sport["targetPort"] in ("metrics", port) and sport["name"] == "metrics"
    pod_labels = the("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = the("ServiceMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["endpoints"]] == [sport["name"]]
    assert monitor["endpoints"][0]["path"] == "/metrics"


# -- the image, built and run for real ---------------------------------------------------------
def _builder_missing() -> str | None:
    if os.geteuid() != 0:
        return "building and running the image needs root (podman's store, runc)"
    if sys.platform != "linux" or not Path("/proc/filesystems").exists():
        return "needs Linux"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "this kernel has no overlayfs (podman's storage driver)"
    return None


needs_builder = pytest.mark.skipif(_builder_missing() is not None,
                                   reason=_builder_missing() or "")


@pytest.fixture(scope="module")
def image_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/build-image.sh's OCI layout (run once per session; ~1-2 min on a fresh host,
    most of it downloading and unpacking the Debian packages of the bases)."""
    out = tmp_path_factory.mktemp("image") / "oci"
    started = time.monotonic()
    done = subprocess.run([str(REPO / "deploy" / "build-image.sh"), "--out", str(out),
                           "--tag", f"localhost/oomguard-test:{os.getpid()}"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout + done.stderr
    print(done.stdout.strip(), f"(built in {time.monotonic() - started:.0f} s)")
    subprocess.run(["podman", "rmi", "--force", f"localhost/oomguard-test:{os.getpid()}"],
                   capture_output=True, timeout=60)
    assert (out / "index.json").is_file()
    return out


def _install(*packages: str) -> None:
    missing = [p for p in packages if shutil.which(p) is None]
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                       capture_output=True, check=True, timeout=300,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


class Container:
    """The image unpacked as a runc bundle, configured as the DaemonSet's pod: host PID
    namespace, the host's /sys/fs/cgroup read-write, the manifest's capabilities only,
    RLIMIT_MEMLOCK at 64 KiB (so mlockall works by CAP_IPC_LOCK alone, as in a pod), a
    read-only root, the manifest's memory limit on its own cgroup. Host network (the test
    reaches the metrics port on 127.0.0.1; a pod has its own IP)."""

    def __init__(self, layout: Path, where: Path, args: list[str],
                 mounts: dict[str, Path] | None = None) -> None:
        _install("runc", "umoci")
        self.id = f"oomguard-test-{os.getpid()}-{len(list(where.iterdir()))}"
        self.bundle = where / self.id
        tag = json.loads((layout / "index.json").read_text())["manifests"][0]["annotations"][
            "org.opencontainers.image.ref.name"]
        subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(self.bundle)],
                       check=True, capture_output=True, timeout=120)
        config = json.loads((self.bundle / "config.json").read_text())
        proc = config["process"]
        proc["terminal"] = False
        proc["args"] = proc["args"][:1] + args  # ENTRYPOINT + the pod's args
        # The manifest's capabilities, less any this host's root lacks itself (the VM these
        # tests run in withholds CAP_SYS_RESOURCE: no process here can pass it on).
        caps = sorted(c for c in ("CAP_" + c for c in pod_capabilities()) if c in HOST_CAPS)
        proc["capabilities"] = {k: caps for k in ("bounding", "effective", "permitted")}
        proc["noNewPrivileges"] = True
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # above: CAP_SYS_RESOURCE
        proc["rlimits"] = [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile},
                           {"type": "RLIMIT_MEMLOCK", "hard": 64 << 10, "soft": 64 << 10}]
        config["root"]["readonly"] = True
        linux = config["linux"]
        linux["namespaces"] = [n for n in linux["namespaces"]
                               if n["type"] not in ("pid", "network")]
        # A cgroup of the test's own (oomguard* at the top), gone with `runc delete`.
        limit = container()["resources"]["limits"]["memory"]
        assert limit.endswith("Mi")
        self.limit = int(limit[:-2]) * MiB
        linux["cgroupsPath"] = f"/{self.id}"
        linux["resources"] = {"memory": {"limit": self.limit}}
        kept = [m for m in config["mounts"]
                if m["destination"] not in ("/sys/fs/cgroup", "/var/lib/oomguard")]
        binds = {"/sys/fs/cgroup": Path("/sys/fs/cgroup"), **(mounts or {})}
        for dest, src in binds.items():
            ro = [] if dest in ("/sys/fs/cgroup", "/var/lib/oomguard") else ["ro"]
            kept.append({"destination": dest, "type": "bind", "source": str(src),
                         "options": ["rbind", "rprivate", *ro]})
        kept.append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                     "options": ["nosuid", "nodev", "size=16m"]})
        config["mounts"] = kept
        (self.bundle / "config.json").write_text(json.dumps(config))
        self.proc: subprocess.Popen[str] | None = None

    def run(self, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["runc", "run", "--bundle", str(self.bundle), self.id],
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def start(self) -> None:
        self.log_path = self.bundle / "stderr.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(["runc", "run", "--bundle", str(self.bundle), self.id],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._log, text=True)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="surrogateescape")

    def pid(self) -> int:
        done = subprocess.run(["runc", "state", self.id], capture_output=True, text=True,
                              timeout=30)
        return int(json.loads(done.stdout)["pid"]) if done.returncode == 0 else 0

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            subprocess.run(["runc", "kill", self.id, "TERM"], capture_output=True, timeout=30)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                subprocess.run(["runc", "kill", self.id, "KILL"], capture_output=True,
                               timeout=30)
                self.proc.wait(timeout=30)
        subprocess.run(["runc", "delete", "--force", self.id], capture_output=True, timeout=30)
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def containers(tmp_path: Path) -> Iterator[list[Container]]:
    made: list[Container] = []
    yield made
    for c in made:
        c.stop()


@needs_builder
@pytest.mark.slow
def test_image_runs_version(image_layout: Path, tmp_path: Path,
                            containers: list[Container]) -> None:
    c = Container(image_layout, tmp_path, ["--version"])
    containers.append(c)
    done = c.run()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"oomguard {__version__}"
    # What ships: python3 and oomguard; no pip, no shell, no package manager's database.
    root = c.bundle / "rootfs"
    assert (root / "usr/local/bin/oomguard").is_file()
    assert not list(root.glob("usr/lib/python3*/*-packages/pip"))
    assert not (root / "bin/sh").exists() and not (root / "usr/bin/sh").exists()
    assert not (root / "var/lib/dpkg").exists()


@needs_memcg
@needs_builder
@pytest.mark.slow
@pytest.mark.v1(reason="the test's own OOM is held with oom_kill_disable; "
                "the image is not in the VM's shared root")
def test_image_as_the_daemonset_handles_an_oom_on_the_host(
        image_layout: Path, tmp_path: Path, memcg: MemoryCgroup, spawn: Spawn,
        containers: list[Container]) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[[rule]]\nname = "t"\nmatch = "{memcg.relpath}"\n'
                      'steps = ["hold", "snapshot", "kill"]\ngrace = "0s"\n')
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    with socket.socket() as s:  # a free port on the host's loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = list(container()["args"])
    args[args.index("--metrics") + 1] = f"127.0.0.1:{port}"
    c = Container(image_layout, tmp_path, args,
                  {"/etc/oomguard/policy.toml": policy, "/var/lib/oomguard": state})
    containers.append(c)
    c.start()

    # Readiness as the kubelet sees it: the probe's path answers once every group is watched.
    probe = container()["readinessProbe"]["httpGet"]["path"]
    url = f"http://127.0.0.1:{port}{probe}"

    def answers() -> bool:
        assert c.proc is not None and c.proc.poll() is None, c.log
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    wait_until(answers, 60, what=f"the readiness probe {url}")
    with urllib.request.urlopen(url, timeout=2) as r:
        text = r.read().decode()
    assert re.search(r"^oomguard_watched_cgroups 1(\.0)?$", text, re.M), text
    assert memcg.oom_state().kill_disabled  # the hold, written from inside the container

    # mlockall worked with RLIMIT_MEMLOCK at 64 KiB: CAP_IPC_LOCK did it.
    daemon = c.pid()
    status = Path(f"/proc/{daemon}/status").read_text()
    locked_kib = int(re.search(r"^VmLck:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]
    assert locked_kib > 8 * 1024, status
    assert "mlockall" not in c.log
    if "CAP_SYS_RESOURCE" in HOST_CAPS:
        assert Path(f"/proc/{daemon}/oom_score_adj").read_text().strip() == "-1000"
    else:  # this host withholds it (see Container): the daemon says so, and runs on
        assert "could not lower oom_score_adj" in c.log, c.log

    service = spawn(STEADY, 8 * MiB)
    assert service.stdout is not None and service.stdout.readline() == b"ready\n"
    leaker = spawn(LEAK, MiB)
    assert leaker.wait(timeout=30) == -signal.SIGKILL
    inc = closed_incident(state / "journal.db")
    assert [v.pid for v in inc.victims] == [leaker.pid]
    assert steps_of(inc)[:3] == [("hold", "held"), ("snapshot", "done"), ("kill", "killed")]
    assert service.poll() is None
    assert memcg.oom_state().oom_kill == 0  # the kernel's killer never ran
    def logged_kill() -> bool:
        lines = [json.loads(ln) for ln in c.log.splitlines() if ln.startswith("{")]
        return any(r.get("event") == "killed" and r.get("pid") == leaker.pid for r in lines)

    wait_until(logged_kill, 10, what=f"the kill as a JSON log line in:\n{c.log}")

    # Within the DaemonSet's memory limit, with room to spare.
    cg = memcg.hierarchies.memory.mount_point / c.id  # type: ignore[union-attr]
    peak = int((cg / "memory.max_usage_in_bytes").read_text())
    print(f"daemon in the image: VmLck {locked_kib} KiB, its cgroup's peak {peak / MiB:.1f} MiB "
          f"of {c.limit / MiB:.0f} MiB")
    assert peak < c.limit * 0.75

    # SIGTERM (what the kubelet sends): the daemon gives the hold back, exits 0.
    assert c.stop() == 0, c.log
    assert hold_released(memcg)
    assert not cg.exists()
