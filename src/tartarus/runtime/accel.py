"""Choose the accelerator by what actually boots, never by what merely exists.

`/dev/kvm` can be present and still unusable for stock guests (PVM nested virtualisation hangs them), so
KVM is chosen only if a probe VM boots our kernel to its first userspace step under it. The verdict is
cached per (kernel, QEMU, host kernel) because a failing probe costs its whole timeout.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

from tartarus.errors import InvalidArgument
from tartarus.paths import cache_dir
from tartarus.runtime.qemu import qemu_binary

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 8.0
# Printed by the kernel when it finds no root to mount: proof that it booted under this accelerator.
PROBE_MARKER = b"Kernel panic"


def _probe_kvm(kernel: Path) -> tuple[bool, str]:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not available"
    with tempfile.TemporaryDirectory(prefix="tartarus-probe-") as tmp:
        console = Path(tmp) / "console.log"
        argv = [
            qemu_binary(),
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-M",
            "microvm,x-option-roms=off,isa-serial=on,acpi=off",
            "-m",
            "128M",
            "-kernel",
            str(kernel),
            "-append",
            "console=ttyS0 panic=-1 reboot=t",
            "-chardev",
            f"file,id=con,path={console}",
            "-serial",
            "chardev:con",
        ]
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            while time.monotonic() - start < PROBE_TIMEOUT_S:
                if console.exists() and PROBE_MARKER in console.read_bytes():
                    return True, f"probe VM booted under KVM in {time.monotonic() - start:.2f} s"
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                    return False, f"probe VM exited under KVM: {err or proc.returncode}"
                time.sleep(0.05)
            return False, f"probe VM did not boot under KVM within {PROBE_TIMEOUT_S:.0f} s"
        finally:
            proc.kill()
            proc.wait()


def _cache_key(kernel: Path) -> str:
    qemu = subprocess.run([qemu_binary(), "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    st = kernel.stat()
    return f"{os.uname().release}|{qemu}|{kernel}|{st.st_size}|{st.st_mtime_ns}"


@functools.cache
def choose_accel(kernel: Path) -> str:
    """Return "kvm" or "tcg". `TARTARUS_ACCEL` overrides the probe."""
    override = os.environ.get("TARTARUS_ACCEL", "").strip().lower()
    if override:
        if override not in ("kvm", "tcg"):
            raise InvalidArgument(f"TARTARUS_ACCEL must be kvm or tcg, not {override!r}")
        log.info("accelerator %s (TARTARUS_ACCEL)", override)
        return override
    cache_file = cache_dir() / "accel.json"
    key = _cache_key(kernel)
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key:
            return str(cached["accel"])
    except (OSError, ValueError):
        pass
    ok, why = _probe_kvm(kernel)
    accel = "kvm" if ok else "tcg"
    log.warning("accelerator: %s (%s)", accel, why)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps({"key": key, "accel": accel, "why": why}))
    return accel
