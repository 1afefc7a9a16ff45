"""Choosing a sandbox's backend: what was asked for, checked against what actually works here.

The VM accelerator is the accelerator probe's verdict (`runtime.accel`: a probe VM booted under KVM,
or TCG); gVisor works if `runsc` ran a probe container (`gvisor.runsc.probe`). Both verdicts come from
running something, once per daemon. A backend that does not work here is a `BackendUnavailable`
(503) naming why, before anything is started.
"""

from __future__ import annotations

import functools
import logging

from tartarus.bootfiles.kernel import kernel_path
from tartarus.errors import BackendUnavailable, InvalidArgument, TartarusError
from tartarus.gvisor.runsc import Support, probe
from tartarus.runtime.accel import choose_accel
from tartarus.sandbox.backend import Backend
from tartarus.sandbox.spec import Admission, SandboxSpec
from tartarus.templates.built import Template
from tartarus.templates.spec import builtin_spec

log = logging.getLogger(__name__)


def vm_backend() -> Backend:
    """The backend VMs get here: `kvm` if a probe VM booted under KVM, else `tcg`."""
    return "kvm" if choose_accel(kernel_path()) == "kvm" else "tcg"


@functools.cache
def gvisor_support() -> Support:
    """Whether gVisor runs a container here (probed once per process: a failing probe costs seconds)."""
    support = probe()
    log.info("gvisor backend: %s (%s)", "works" if support.works else "unavailable", support.reason)
    return support


def check_available(backend: Backend) -> None:
    """Raise `BackendUnavailable` unless sandboxes of `backend` can run on this host."""
    if backend == "gvisor":
        support = gvisor_support()
        if not support.works:
            raise BackendUnavailable(f"the gvisor backend does not work on this host: {support.reason}")
        return
    vm = vm_backend()
    if backend != vm:  # a KVM snapshot does not load under TCG, and TCG on a KVM host only wastes it
        raise BackendUnavailable(
            f"the {backend} backend is not available here: this host runs VMs under {vm} "
            f"(the accelerator probe's verdict), so ask for {vm} or gvisor"
        )


def available() -> list[Backend]:
    """The backends that work on this host (the VM one first)."""
    found: list[Backend] = [vm_backend()]
    if gvisor_support().works:
        found.append("gvisor")
    return found


@functools.lru_cache(maxsize=256)
def template_backend(name: str, key: str) -> Backend | None:
    """The backend a template's YAML asks for (`backend:`), read once per build (`key`); None when it
    names none or the template's spec is not in templates/. Not part of the build: both backends
    serve the same root filesystem."""
    try:
        spec = builtin_spec(name)
    except TartarusError:
        return None
    return spec.backend


def choose(requested: Backend | None, template: Template, daemon: Backend | None) -> Backend:
    """The create's own choice, else the template's, else the daemon's, else the host's VM backend;
    checked to work here."""
    backend = requested or template_backend(template.name, template.key) or daemon or vm_backend()
    check_available(backend)
    return backend


def refuse_on_gvisor(template: Template, spec: SandboxSpec, admission: Admission) -> None:
    """What a gVisor sandbox cannot honour yet is refused before it starts, never silently dropped: a
    service template and the limits nothing enforces on it yet (an idle timeout hibernates it, through
    `runsc checkpoint`, as a VM's does).
    Its egress policy and network rates, a quarantine verdict (the gate closes before its egress rules
    exist), its vCPUs (a CFS quota) and memory are enforced as a VM's are: by its network namespace
    and its cgroups."""
    if template.start is not None:
        raise InvalidArgument(
            f"template {template.name!r} starts a service before its snapshot, which the gvisor backend "
            "does not do yet: use a VM backend"
        )
    # A VM's are enforced by the guest kernel (threads-max, which gVisor's Sentry does not have) and by
    # QEMU (the layer's size, disk throttles); network rates are tc's on the NIC, a veth's as a TAP's.
    asked = {"max_processes": spec.max_processes, "disk_mib": spec.disk_mib}
    unenforced = [name for name, value in asked.items() if value is not None]
    bandwidth = admission.limits.bandwidth
    if bandwidth.disk_bytes_per_s is not None or bandwidth.disk_iops is not None:
        unenforced.append("the policy's disk bandwidth limits")
    if unenforced:
        raise InvalidArgument(
            f"the gvisor backend does not enforce {', '.join(unenforced)} yet: leave them to the "
            "template's defaults, or use a VM backend"
        )
