"""Which container and pod a memory cgroup is: from its path, and names from the node.

Two halves:
- `parse_path(relpath)`: pure, on the path alone. Recognises the layouts of the kubelet
  (cgroupfs and systemd drivers, cgroup v1 and v2: the same names under either mount),
  containerd, CRI-O, Docker and Podman: the pod UID, the QoS class and the container id.
- `ContainerIndex.lookup(relpath)`: adds names (namespace, pod, container) and the OCI
  annotations, read from the runtime's state on this node, never from the network: runc's
  `state.json` (its config's labels are the bundle's annotations), containerd's and CRI-O's
  bundle `config.json`. Bounded (a file of at most `MAX_METADATA` bytes, at most
  `MAX_ANNOTATIONS` annotations, each value cut to `MAX_VALUE`), cached per cgroup. The
  engine reads it when it adopts a group and a few times after (a runtime writes its state
  after it made the cgroup), never between an OOM event and the kill.

Every name here comes from whoever made the container: attacker-controlled text. It is
bounded here and escaped (escape.printable) wherever a person sees it.

The layouts, checked against the sources:
- kubelet, pkg/kubelet/cm/cgroup_manager_linux.go and pod_container_manager_linux.go
  (kubernetes/kubernetes): the node allocatable group "kubepods", a QoS group
  "burstable"/"besteffort" (Guaranteed pods sit directly under kubepods), and a pod group
  "pod" + UID (`podCgroupNamePrefix = "pod"`). The systemd driver turns the name
  {kubepods, burstable, pod<uid>} into nested slices `kubepods.slice/kubepods-burstable.slice/
  kubepods-burstable-pod<uid>.slice`, escaping "-" in each part as "_" (so the UID's dashes
  read "_"; `unescapeSystemdCgroupName` turns them back).
- containerd's CRI plugin (internal/cri/server/helpers_linux.go `getCgroupsPath`): with a
  systemd parent the OCI cgroupsPath is `<slice>:cri-containerd:<id>`, which runc makes the
  unit `cri-containerd-<id>.scope`; with cgroupfs, `<parent>/<id>`. Its bundles are
  /run/containerd/io.containerd.runtime.v2.task/<namespace>/<id>/config.json.
- CRI-O (internal/config/cgmgr: `CrioPrefix = "crio"`): `crio-<id>.scope` (systemd) or
  `<parent>/crio-<id>` (cgroupfs); its monitor `crio-conmon-<id>.scope` is not the
  container. Bundles: /run/containers/storage/overlay-containers/<id>/userdata/config.json.
- Docker: `docker-<id>.scope` (systemd) or `/docker/<id>` (cgroupfs); Podman: `libpod-<id>.scope`
  (systemd) or `/libpod_parent/libpod-<id>` (cgroupfs); `libpod-conmon-<id>.scope` is conmon.
- runc's own state: /run/runc/<id>/state.json (containerd's runc: /run/containerd/runc/<ns>/<id>,
  Docker's: /run/docker/runtime-runc/moby/<id>); its `config.labels` list holds
  "bundle=<dir>" and every annotation as "key=value" (seen with runc 1.1.5 here).
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

__all__ = [
    "QOS_CLASSES",
    "ContainerIdentity",
    "ContainerIndex",
    "default_index",
    "parse_path",
]

#: The kubelet's QoS classes, in the order oomguard's Kubernetes policy sacrifices them.
QOS_CLASSES = ("besteffort", "burstable", "guaranteed")

MAX_METADATA = 1 << 20  # bytes of a state.json/config.json read; a larger one is skipped
MAX_ANNOTATIONS = 64
MAX_KEY = 253  # a Kubernetes annotation key is at most 253 + "/" + 63
MAX_VALUE = 256
MAX_NAME = 253  # a pod name is a DNS subdomain (<= 253); namespace and container <= 63
MAX_ID = 128

_HEX_ID = re.compile(r"[0-9a-f]{64}")
# systemd scope units of container runtimes: "<prefix>-<id>.scope"
_SCOPE = re.compile(
    r"(?P<prefix>cri-containerd|crio-conmon|crio|docker|libpod-conmon|libpod)-(?P<id>[^/]+)\.scope")
_RUNTIME_OF_PREFIX = {"cri-containerd": "containerd", "crio": "cri-o", "docker": "docker",
                      "libpod": "podman"}
_KUBE_QOS_SEGMENTS = {"burstable": "burstable", "besteffort": "besteffort"}
_SYSTEMD_POD = re.compile(r"kubepods(?:-(?P<qos>burstable|besteffort))?-pod(?P<uid>[0-9a-fA-F_]+)"
                          r"\.slice")
_SYSTEMD_QOS = re.compile(r"kubepods-(?P<qos>burstable|besteffort)\.slice")
_CGROUPFS_POD = re.compile(r"pod(?P<uid>[0-9a-fA-F-]{8,64})")

_ANN_POD = "io.kubernetes.pod.name"
_ANN_NAMESPACE = "io.kubernetes.pod.namespace"
_ANN_CONTAINER = "io.kubernetes.container.name"
_ANN_POD_UID = "io.kubernetes.pod.uid"
# containerd's CRI plugin writes its own keys (pkg/cri/annotations): the same names.
_ANN_CRI_POD = "io.kubernetes.cri.sandbox-name"
_ANN_CRI_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
_ANN_CRI_CONTAINER = "io.kubernetes.cri.container-name"
_ANN_CRI_POD_UID = "io.kubernetes.cri.sandbox-uid"
_ANN_CRI_TYPE = "io.kubernetes.cri.container-type"  # "sandbox" for the pause container
_ANN_CRIO_NAME = "io.kubernetes.cri-o.ContainerName"  # CRI-O: "k8s_<ctr>_<pod>_<ns>_..."


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True, slots=True)
class ContainerIdentity:
    """What a cgroup is, as far as the node knows. Every text field is bounded; names are
    "" when unknown. `annotations` are the OCI annotations read (bounded, not escaped)."""

    runtime: str = ""  # containerd, cri-o, docker, podman, runc; "" when only the path says
    id: str = ""  # the container id; "" for a pod's or a QoS class's own group
    pod_uid: str = ""
    qos: str = ""  # guaranteed, burstable, besteffort; "" outside the kubelet's tree
    namespace: str = ""
    pod: str = ""
    container: str = ""
    sandbox: bool = False  # the pod's pause container
    annotations: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    named: bool = False  # metadata was found and read

    @property
    def is_pod(self) -> bool:
        """A Kubernetes pod's group (or a container in one)."""
        return bool(self.pod_uid or self.pod)

    def label(self) -> str:
        """Short text for people: "shop/web-7d9f/app", "pod 3c1f... (burstable)",
        "docker 9f2e1234abcd". Not escaped: callers print through escape.printable."""
        if self.pod or self.namespace:
            names = "/".join(p for p in (self.namespace, self.pod, self.container) if p)
        elif self.pod_uid:
            names = f"pod {self.pod_uid}" + (f" container {self.short_id}" if self.id else "")
        else:
            names = " ".join(p for p in (self.runtime or "container", self.short_id) if p)
        return f"{names} ({self.qos})" if self.qos else names

    @property
    def short_id(self) -> str:
        return self.id[:12] if _HEX_ID.fullmatch(self.id) else self.id

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for key in ("runtime", "id", "pod_uid", "qos", "namespace", "pod", "container"):
            value = getattr(self, key)
            if value:
                out[key] = value
        if self.sandbox:
            out["sandbox"] = True
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @classmethod
    def from_json(cls, data: object) -> ContainerIdentity | None:
        """Back from the journal's JSON; None for anything that is not such an object."""
        if not isinstance(data, Mapping):
            return None

        def text(key: str, limit: int = MAX_NAME) -> str:
            value = data.get(key)
            return _bounded(value, limit) if isinstance(value, str) else ""

        raw = data.get("annotations")
        annotations = _bounded_annotations(raw.items() if isinstance(raw, Mapping) else ())
        return cls(runtime=text("runtime", 32), id=text("id", MAX_ID), pod_uid=text("pod_uid", 64),
                   qos=text("qos", 16), namespace=text("namespace"), pod=text("pod"),
                   container=text("container"), sandbox=data.get("sandbox") is True,
                   annotations=annotations, named=bool(text("pod") or text("container")))

    def metric_labels(self) -> tuple[str, str, str]:
        """(namespace, pod, container) for the metrics: names only (never ids or paths),
        "" where unknown."""
        return (_bounded(self.namespace, 63), _bounded(self.pod, MAX_NAME),
                _bounded(self.container, 63))


def _bounded_annotations(items: Iterable[tuple[object, object]]) -> Mapping[str, str]:
    out: dict[str, str] = {}
    for key, value in items:
        if len(out) >= MAX_ANNOTATIONS:
            break
        if isinstance(key, str) and isinstance(value, str) and key:
            out[_bounded(key, MAX_KEY)] = _bounded(value, MAX_VALUE)
    return MappingProxyType(out)


def parse_path(relpath: str) -> ContainerIdentity | None:
    """The container/pod a cgroup path names, from the path alone; None if none does.

    A group below a container's own (`libpod-<id>.scope/container`, a child cgroup a
    container made) is that container."""
    parts = [p for p in relpath.split("/") if p]
    runtime = cid = uid = qos = ""
    kube = False
    container_at = -1
    for i, part in enumerate(parts):
        if part in ("kubepods", "kubepods.slice"):
            kube, qos, uid, cid, runtime, container_at = True, "guaranteed", "", "", "", -1
            continue
        if kube and not uid:
            if part in _KUBE_QOS_SEGMENTS:
                qos = _KUBE_QOS_SEGMENTS[part]
                continue
            m = _SYSTEMD_QOS.fullmatch(part)
            if m:
                qos = m.group("qos")
                continue
            m = _SYSTEMD_POD.fullmatch(part)
            if m:
                uid = m.group("uid").replace("_", "-")
                qos = m.group("qos") or qos
                continue
            m = _CGROUPFS_POD.fullmatch(part)
            if m:
                uid = m.group("uid")
                continue
        m = _SCOPE.fullmatch(part)
        if m:
            if m.group("prefix").endswith("conmon"):
                return None  # the runtime's monitor process, not the container
            runtime, cid, container_at = _RUNTIME_OF_PREFIX[m.group("prefix")], m.group("id"), i
            continue
        if container_at < 0:
            if kube and uid and i > 0:
                # cgroupfs under a pod: every child is a container (<id> or crio-<id>)
                runtime, cid = ("cri-o", part[5:]) if part.startswith("crio-") else ("", part)
                container_at = i
            elif _HEX_ID.fullmatch(part) and i > 0 and parts[i - 1] == "docker":
                runtime, cid, container_at = "docker", part, i
            elif part.startswith("libpod-") and i > 0 and parts[i - 1] == "libpod_parent":
                runtime, cid, container_at = "podman", part[len("libpod-"):], i
    if not (uid or cid):
        return None
    return ContainerIdentity(runtime=runtime, id=_bounded(cid, MAX_ID), pod_uid=uid[:64],
                             qos=qos if kube else "")


# -- names from the node ------------------------------------------------------------------

#: Where runtimes keep their state on the node (for the metadata, never the network).
DEFAULT_ROOTS = ("/run",)


def _read_json(path: str) -> object:
    """A small JSON file, or None: missing, unreadable, too large, not JSON. O_NOFOLLOW: a
    container's state dir is root's, but never follow a link planted where we look."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_METADATA:
            return None
        data = os.read(fd, MAX_METADATA + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) > MAX_METADATA:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _safe_id(cid: str) -> bool:
    return bool(cid) and len(cid) <= MAX_ID and "/" not in cid and cid not in (".", "..") \
        and "\0" not in cid


def _annotations_of(document: object) -> dict[str, str] | None:
    """The annotations of an OCI config.json, or of a runc state.json (config.labels)."""
    if not isinstance(document, Mapping):
        return None
    found = document.get("annotations")
    if isinstance(found, Mapping):
        return {k: v for k, v in found.items() if isinstance(k, str) and isinstance(v, str)}
    config = document.get("config")
    if isinstance(config, Mapping) and isinstance(config.get("labels"), list):
        out: dict[str, str] = {}
        for item in config["labels"]:
            if isinstance(item, str) and "=" in item:
                key, _, value = item.partition("=")
                if key != "bundle":
                    out[key] = value
        return out
    return None


class ContainerIndex:
    """Identities of cgroups, cached per path (bounded, least recently used dropped)."""

    def __init__(self, roots: Iterable[str] = DEFAULT_ROOTS, max_entries: int = 4096) -> None:
        self.roots = tuple(roots)
        self.max_entries = max_entries
        self._cache: OrderedDict[str, ContainerIdentity | None] = OrderedDict()

    def lookup(self, relpath: str) -> ContainerIdentity | None:
        """The identity of `relpath` (cached); metadata is read the first time only."""
        if relpath in self._cache:
            self._cache.move_to_end(relpath)
            return self._cache[relpath]
        found = self._identify(relpath)
        if found is None:
            return None  # no container by its path: nothing to keep (parse_path: ~10 us)
        self._cache[relpath] = found
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return found

    def peek(self, relpath: str) -> ContainerIdentity | None:
        """What is cached for `relpath`, never reading anything (for the hot path)."""
        return self._cache.get(relpath)

    def refresh(self, relpath: str) -> ContainerIdentity | None:
        """Look again if the names were not found (a runtime writes its state after it made
        the cgroup); a named identity is kept as it is."""
        known = self._cache.get(relpath)
        if known is not None and known.named:
            return known
        self._cache.pop(relpath, None)
        return self.lookup(relpath)

    def forget(self, relpath: str) -> None:
        self._cache.pop(relpath, None)

    def _identify(self, relpath: str) -> ContainerIdentity | None:
        found = parse_path(relpath)
        if found is None or not found.id or not _safe_id(found.id):
            return found
        annotations = None
        for path in self._candidates(found.id):
            document = _read_json(path)
            annotations = _annotations_of(document)
            if annotations is not None:
                if found.runtime == "" and "/runc/" in path:
                    found = replace(found, runtime="runc")
                break
        if annotations is None:
            return found
        return _named(found, annotations)

    def _candidates(self, cid: str) -> Iterable[str]:
        """The files that may describe container `cid`, most specific first. Only a few
        directory listings (containerd's namespaces), never a walk."""
        for root in self.roots:
            yield f"{root}/runc/{cid}/state.json"
            for base in (f"{root}/containerd/io.containerd.runtime.v2.task",
                         f"{root}/containerd/runc"):
                for ns in _small_listing(base):
                    yield (f"{base}/{ns}/{cid}/config.json" if base.endswith(".task")
                           else f"{base}/{ns}/{cid}/state.json")
            yield f"{root}/containers/storage/overlay-containers/{cid}/userdata/config.json"
            yield f"{root}/docker/runtime-runc/moby/{cid}/state.json"


def _small_listing(path: str, limit: int = 32) -> list[str]:
    try:
        with os.scandir(path) as entries:
            names: list[str] = []
            for entry in entries:
                if len(names) >= limit:
                    break
                if _safe_id(entry.name):
                    names.append(entry.name)
            return names
    except OSError:
        return []


def _named(found: ContainerIdentity, annotations: Mapping[str, str]) -> ContainerIdentity:
    def first(*keys: str, limit: int = MAX_NAME) -> str:
        for key in keys:
            value = annotations.get(key)
            if value:
                return _bounded(value, limit)
        return ""

    uid = found.pod_uid or first(_ANN_POD_UID, _ANN_CRI_POD_UID, limit=64)
    return replace(
        found,
        pod_uid=uid,
        namespace=first(_ANN_NAMESPACE, _ANN_CRI_NAMESPACE, limit=63),
        pod=first(_ANN_POD, _ANN_CRI_POD),
        container=first(_ANN_CONTAINER, _ANN_CRI_CONTAINER, limit=63),
        sandbox=annotations.get(_ANN_CRI_TYPE) == "sandbox",
        annotations=_bounded_annotations(sorted(annotations.items())),
        named=True,
    )


_DEFAULT: ContainerIndex | None = None


def default_index() -> ContainerIndex:
    """The process's one index (the daemon's discovery and engine share its cache)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = ContainerIndex()
    return _DEFAULT
