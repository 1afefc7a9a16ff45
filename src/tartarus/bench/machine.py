"""What a benchmark ran on: stated in every result so numbers are never read without their context."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from typing import Any

from tartarus.paths import REPO_ROOT, cache_dir


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_rev() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def _qemu_version() -> str:
    try:
        out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
        return out.stdout.splitlines()[0]
    except (OSError, IndexError):
        return "unknown"


def _accel_reason(accel: str | None) -> str | None:
    """Why this accelerator: the override, or what the KVM probe saw (recorded by `choose_accel`)."""
    if os.environ.get("TARTARUS_ACCEL"):
        return "set by TARTARUS_ACCEL"
    try:
        probe = json.loads((cache_dir() / "accel.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(probe, dict) or probe.get("accel") != accel or not probe.get("why"):
        return None
    return str(probe["why"])


def _gvisor() -> str:
    """Whether the gvisor backend works here, and which runsc (its probe's words)."""
    from tartarus.gvisor.runsc import probe

    support = probe()
    return support.reason if support.works else f"unavailable: {support.reason}"


def machine_info(accel: str | None = None) -> dict[str, Any]:
    mem_kib = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "host_kernel": platform.release(),
        "os": platform.freedesktop_os_release().get("PRETTY_NAME", "unknown")
        if hasattr(platform, "freedesktop_os_release")
        else "unknown",
        "qemu": _qemu_version(),
        "accel": accel,
        "accel_reason": _accel_reason(accel) if accel else None,
        "kvm_device": os.path.exists("/dev/kvm"),
        "gvisor": _gvisor(),
        "git_rev": _git_rev(),
    }
