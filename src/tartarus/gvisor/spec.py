"""The OCI runtime spec (`config.json`) of one gVisor sandbox, as pure text from typed values.

The container's first process is a shell that starts the guest agent as its child: the agent runs as
the VM's init when it is PID 1 (assembling disks a container does not have), so here it must not be PID
1, and the shell, as the sandbox's PID 1, reaps the orphans of the commands the agent runs. The agent
serves the protocol on its stdin (`--serve-fd 0`), which runsc hands into the sandbox: the host gives
one end of a socketpair as that stdin, so no C change and no socket file are needed.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tartarus.errors import InvalidArgument

OCI_VERSION = "1.0.2"
# Where the host's agent binary is bind-mounted (read-only); the directory exists in every extracted
# template tree (gvisor/rootfs.py), since runsc cannot create a mount point in a read-only tree.
AGENT_DIR = "/.tartarus"
AGENT_PATH = f"{AGENT_DIR}/agent"
SHELL = "/bin/sh"
# Docker's default capability set: enough for package installs and file ownership changes as root,
# nothing that administers the (user-space) kernel.
CAPABILITIES = (
    "CAP_AUDIT_WRITE", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_MKNOD", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP",
    "CAP_SETUID", "CAP_SYS_CHROOT",
)  # fmt: skip
NOFILE = 65536
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class BundleSpec:
    """What one sandbox's container is made of."""

    rootfs: Path  # the template's shared tree; runsc's overlay keeps it unchanged
    agent: Path  # the host's static guest agent binary
    hostname: str
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str = "/"

    def __post_init__(self) -> None:
        for name, path in (("rootfs", self.rootfs), ("agent", self.agent)):
            if not path.is_absolute():
                raise InvalidArgument(f"the {name} path must be absolute, not {str(path)!r}")
        if not self.workdir.startswith("/"):
            raise InvalidArgument(f"the working directory must be absolute, not {self.workdir!r}")
        for key, value in self.env.items():
            if not key or "=" in key or "\0" in key + value:
                raise InvalidArgument(f"bad environment variable {key!r}")

    def to_json(self) -> dict[str, Any]:
        """As written down beside a capture or a running sandbox: a restore needs this very spec."""
        return {
            "rootfs": str(self.rootfs), "agent": str(self.agent), "hostname": self.hostname,
            "env": dict(self.env), "workdir": self.workdir,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BundleSpec:
        env = {str(k): str(v) for k, v in dict(data["env"]).items()}
        return cls(
            Path(data["rootfs"]), Path(data["agent"]), str(data["hostname"]), env, str(data["workdir"])
        )


def agent_command() -> list[str]:
    """The container's process: a shell (PID 1) running the agent on the channel of its stdin."""
    return [SHELL, "-c", f"{shlex.quote(AGENT_PATH)} --serve-fd 0; exit $?"]


def _env(env: Mapping[str, str]) -> list[str]:
    merged = {"PATH": DEFAULT_PATH, **env}
    return [f"{k}={v}" for k, v in merged.items()]


def _mounts(agent: Path) -> list[dict[str, Any]]:
    """The kernel filesystems gVisor provides, and the agent binary; everything else is the tree."""
    sysfs_options = ["nosuid", "noexec", "nodev", "ro"]
    return [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": sysfs_options},
        {"destination": AGENT_PATH, "type": "bind", "source": str(agent), "options": ["bind", "ro"]},
    ]


def _namespaces(netns: Path | None) -> list[dict[str, str]]:
    """New namespaces, but the network one named when the sandbox has a network (`netns`, whose
    interfaces runsc's netstack adopts); without one, a new empty namespace and only loopback."""
    network = {"type": "network"} | ({"path": str(netns)} if netns is not None else {})
    return [{"type": t} for t in ("pid", "ipc", "uts", "mount")] + [network]


def config(spec: BundleSpec, netns: Path | None = None) -> dict[str, Any]:
    """The OCI spec as JSON values (runsc reads `config.json`; this is its only producer)."""
    caps = list(CAPABILITIES)
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": agent_command(),
            "env": _env(spec.env),
            "cwd": spec.workdir,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": NOFILE, "soft": NOFILE}],
        },
        # Writable only through runsc's overlay (`--overlay2=root:...`): the tree itself is never written.
        "root": {"path": str(spec.rootfs), "readonly": False},
        "hostname": spec.hostname,
        "mounts": _mounts(spec.agent),
        "linux": {
            "namespaces": _namespaces(netns),
        },
    }


def config_json(spec: BundleSpec, netns: Path | None = None) -> str:
    return json.dumps(config(spec, netns), indent=2) + "\n"
