"""Building, loading and attaching the datapath's programs, without bcc: clang, then bpftool, then tc.

- `build()` compiles `bpf/src/` with clang into an object cached by the hash of its sources (a node builds it once;
  a changed source is a new object);
- `Loaded.load(obj, pin_dir)` loads the object with `bpftool prog loadall` and pins its programs and maps under
  `pin_dir/<object hash>/` (a node's own folder, named after the node or lab: nothing is shared between nodes or
  labs); loading again finds the pins and reuses them, so an agent's restart keeps its maps;
- `attach(ifname)` puts the two programs on a pod's host-side veth (clsact, direct action), in the caller's network
  namespace (the agent's, the node's); the veth's removal takes them away;
- `attach_cgroup(path)` puts the socket load balancer (`sock.c`, its own object and maps, pinned in `sock/`) on a
  cgroup v2: the node's, where its pods' processes live;
- `remove(pin_dir)` unpins everything of a node.

bpffs is not mounted at boot on these machines: `ensure_bpffs()` mounts it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bpf import syscall
from bpf.lbmaps import LbBackendMap, LbCounters, LbRevNatMap, LbServiceMap
from bpf.maps import Counters, CtMap, EndpointMap, IpcacheMap, PolicyMap

__all__ = [
    "BPFFS",
    "BuildError",
    "LoadError",
    "Loaded",
    "build",
    "cgroup2_mount",
    "default_cache_dir",
    "ensure_bpffs",
    "remove",
    "sock_object",
]

SOURCE_DIR = Path(__file__).parent / "src"
BPFFS = Path("/sys/fs/bpf")
POLICY_MAP_ENTRIES = 65536  # the inner map template's, in datapath.c: they must match


class BuildError(RuntimeError):
    """clang could not compile the datapath; the message carries its output."""


class LoadError(RuntimeError):
    """bpftool or tc refused; the message carries their output."""


def source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(SOURCE_DIR.glob("*.[ch]")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    if override := os.environ.get("CLUSTERMESH_BPF_CACHE"):
        return Path(override)
    return Path("/var/cache/clustermesh/bpf") if os.geteuid() == 0 else Path.home() / ".cache/clustermesh/bpf"


PROGRAMS = ("datapath", "sock")  # each bpf/src/<name>.c is one object


def build(cache_dir: Path | None = None) -> Path:
    """The compiled datapath object of the current sources, its socket load balancer (`sock_object(...)`) beside
    it (compiled now if the cache does not hold them yet)."""
    cache_dir = cache_dir or default_cache_dir()
    digest = source_hash()
    targets = {name: cache_dir / f"{name}-{digest}.o" for name in PROGRAMS}
    if all(target.exists() for target in targets.values()):
        return targets["datapath"]
    clang = shutil.which("clang")
    if clang is None:
        raise BuildError("clang is not installed: run `make setup` (Debian packages clang, libbpf-dev)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    multiarch = f"/usr/include/{platform.machine()}-linux-gnu"
    for name, target in targets.items():
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        source = SOURCE_DIR / f"{name}.c"
        command = [clang, "-O2", "-g", "-Wall", "-Werror", "-target", "bpf", f"-I{SOURCE_DIR}", f"-I{multiarch}",
                   "-c", str(source), "-o", str(partial)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise BuildError(f"clang failed on {source}:\n{result.stderr.strip()}")
        partial.replace(target)
    return targets["datapath"]


def sock_object(datapath_object: Path) -> Path:
    return datapath_object.with_name(datapath_object.name.replace("datapath-", "sock-", 1))


def ensure_bpffs() -> None:
    """Mount bpffs at /sys/fs/bpf unless it is there (mounts are read from /proc/mounts)."""
    mounts = Path("/proc/mounts").read_text().splitlines()
    if any(line.split()[1:3] == [str(BPFFS), "bpf"] for line in mounts if len(line.split()) > 2):
        return
    BPFFS.mkdir(parents=True, exist_ok=True)
    _run(["mount", "-t", "bpf", "bpf", str(BPFFS)], "mount bpffs")


def _run(command: list[str], what: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LoadError(f"{what}: `{' '.join(command)}` failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout


@dataclass
class Loaded:
    """One node's loaded datapath: its pins, and its maps open."""

    pin_dir: Path  # the node's folder; the object's pins are below it, in a folder named after the object's hash
    object_dir: Path

    @classmethod
    def load(cls, obj: Path, pin_dir: Path) -> Loaded:
        ensure_bpffs()
        object_dir = pin_dir / obj.stem.removeprefix("datapath-")
        if not (object_dir / "progs" / "cm_from_pod").exists() or not (object_dir / "sock" / "progs").exists():
            for old in pin_dir.iterdir() if pin_dir.exists() else []:  # an older object's pins: unused from now
                if old.is_dir() and old != object_dir:
                    _remove_tree(old)
            _remove_tree(object_dir)
            (object_dir / "sock").mkdir(parents=True)
            # the socket programs first: their load balancer maps are pinned, and the datapath reuses them
            sock = sock_object(obj)
            lb_maps = object_dir / "sock" / "maps"
            _run(["bpftool", "prog", "loadall", str(sock), str(object_dir / "sock" / "progs"), "pinmaps",
                  str(lb_maps)], f"loading {sock.name}")  # fmt: skip
            reuse = [arg for name in LB_MAPS for arg in ("map", "name", name, "pinned", str(lb_maps / name))]
            _run(["bpftool", "prog", "loadall", str(obj), str(object_dir / "progs"), "type", "classifier", *reuse,
                  "pinmaps", str(object_dir / "maps")], f"loading {obj.name}")  # fmt: skip
        (object_dir / "policy").mkdir(exist_ok=True)
        loaded = cls(pin_dir, object_dir)
        loaded.open()
        return loaded

    def open(self) -> None:
        maps = self.object_dir / "maps"
        self.ipcache = IpcacheMap(syscall.MapFd.pinned(str(maps / "cm_ipcache")))
        self.endpoints = EndpointMap(syscall.MapFd.pinned(str(maps / "cm_endpoints")))
        self.policy_maps = syscall.MapFd.pinned(str(maps / "cm_policy"))
        self.ct = CtMap(syscall.MapFd.pinned(str(maps / "cm_ct")))
        self.counters = Counters(syscall.MapFd.pinned(str(maps / "cm_counters")))
        self.events_path = maps / "cm_events"
        lb = self.object_dir / "sock" / "maps"
        self.lb_services = LbServiceMap(syscall.MapFd.pinned(str(lb / "cm_lb_services")))
        self.lb_backends = LbBackendMap(syscall.MapFd.pinned(str(lb / "cm_lb_backends")))
        self.lb_revnat = LbRevNatMap(syscall.MapFd.pinned(str(lb / "cm_lb_revnat")))
        self.lb_counters = LbCounters(syscall.MapFd.pinned(str(lb / "cm_lb_counters")))
        self.sock_events_path = lb / "cm_sock_events"

    def close(self) -> None:
        for raw in (self.ipcache.raw, self.endpoints.raw, self.policy_maps, self.ct.raw, self.counters.raw,
                    self.lb_services.raw, self.lb_backends.raw, self.lb_revnat.raw, self.lb_counters.raw):  # fmt: skip
            if isinstance(raw, syscall.MapFd):
                raw.close()

    # --- one endpoint's policy map

    def policy_map(self, ifindex: int) -> PolicyMap:
        """The endpoint's policy map (made, pinned and put in cm_policy if it has none)."""
        path = self.object_dir / "policy" / str(ifindex)
        if path.exists():
            return PolicyMap(syscall.MapFd.pinned(str(path)))
        fd = syscall.create_map(syscall.MAP_TYPE_LPM_TRIE, PolicyMap.key_size, PolicyMap.value_size,
                                POLICY_MAP_ENTRIES, flags=syscall.F_NO_PREALLOC, name=f"cm_pol_{ifindex}")  # fmt: skip
        raw = syscall.MapFd(fd)
        syscall.obj_pin(fd, str(path))
        self.policy_maps.update(ifindex.to_bytes(4, "little"), fd.to_bytes(4, "little"))
        return PolicyMap(raw)

    def forget_endpoint(self, ifindex: int) -> None:
        """The endpoint is gone: its settings, its policy map."""
        self.endpoints.remove(ifindex)
        self.policy_maps.delete(ifindex.to_bytes(4, "little"))
        (self.object_dir / "policy" / str(ifindex)).unlink(missing_ok=True)

    # --- programs on a veth

    def attach(self, ifname: str, *, netns: str | None = None) -> None:
        """Both programs on a pod's host-side veth, in this process's network namespace (or the named one's:
        `nsenter --net`, which keeps the host's bpffs, where `ip netns exec` would hide it)."""
        progs = self.object_dir / "progs"
        prefix = _in_netns(netns)
        _run([*prefix, "tc", "qdisc", "replace", "dev", ifname, "clsact"], f"clsact on {ifname}")
        for hook, program in (("ingress", "cm_from_pod"), ("egress", "cm_to_pod")):
            _run([*prefix, "tc", "filter", "replace", "dev", ifname, hook, "pref", "1", "handle", "1", "bpf", "da",
                  "pinned", str(progs / program)], f"{program} on {ifname}")  # fmt: skip

    def attached(self, ifname: str, *, netns: str | None = None) -> bool:
        result = subprocess.run([*_in_netns(netns), "tc", "filter", "show", "dev", ifname, "ingress"],
                                capture_output=True, text=True, check=False)  # fmt: skip
        return "cm_from_pod" in result.stdout

    # --- the socket load balancer on a cgroup

    def attach_cgroup(self, cgroup: Path) -> None:
        """The socket programs on a cgroup (v2): every process below it has its connections to frontends balanced.
        Attaching again replaces them (a restarted agent, a new object)."""
        progs = self.object_dir / "sock" / "progs"
        for hook in SOCK_HOOKS:
            _run(["bpftool", "cgroup", "attach", str(cgroup), hook, "pinned", str(progs / f"cm_sock_{hook}")],
                 f"cm_sock_{hook} on {cgroup}")  # fmt: skip

    def cgroup_attached(self, cgroup: Path) -> bool:
        result = subprocess.run(["bpftool", "cgroup", "show", str(cgroup)], capture_output=True, text=True,
                                check=False)  # fmt: skip
        return all(f"cm_sock_{hook}" in result.stdout for hook in SOCK_HOOKS)


SOCK_HOOKS = ("connect4", "sendmsg4", "recvmsg4", "getpeername4")
#: the maps both objects use (lb_maps.h): the socket object's pins, reused by the datapath's
LB_MAPS = ("cm_lb_services", "cm_lb_backends", "cm_lb_revnat", "cm_lb_reverse_sk", "cm_lb_counters", "cm_lb_flows")


def cgroup2_mount() -> Path:
    """Where cgroup v2 is mounted (hybrid hosts mount it at /sys/fs/cgroup/unified); mounted at
    /run/clustermesh/cgroupv2 when nowhere (as Cilium mounts its own at /run/cilium/cgroupv2)."""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    own = Path("/run/clustermesh/cgroupv2")
    own.mkdir(parents=True, exist_ok=True)
    _run(["mount", "-t", "cgroup2", "none", str(own)], "mount cgroup2")
    return own


def _in_netns(netns: str | None) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{netns}"] if netns else []


def _remove_tree(path: Path) -> None:
    """Unpin everything below `path` (bpffs: files are pins, folders are folders)."""
    if not path.exists():
        return
    for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if child.is_dir():
            child.rmdir()
        else:
            child.unlink()
    path.rmdir()


def remove(pin_dir: Path) -> bool:
    """Unpin a node's whole datapath (its programs stay on veths until those go); whether there was one."""
    existed = pin_dir.exists()
    _remove_tree(pin_dir)
    return existed
