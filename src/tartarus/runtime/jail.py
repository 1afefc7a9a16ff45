"""The VMM's jail: a uid of its own and a filesystem view holding only its files (`launcher.c` enters it).

Uids come from a range (`TARTARUS_VMM_UIDS=start:count`, default far above any login or container
range). A uid is claimed by an flock on `/run/tartarus/vmm-uids/<uid>` whose file QEMU inherits: the
claim lasts exactly as long as the VMM, whichever daemon started it, and a `kill -9` of everything
leaves no allocation to clean up. The range's first id is a group, not a VMM: the template files that
every VMM of a template maps (root filesystem, memory file) are readable by it and writable by none,
and reachable only through a jail's bind mounts (read-only), since the cache and state directories
above them are root's alone.

The jail mirrors host paths (a tmpfs root holding bind mounts at the same paths), so QEMU's command
line, the sandbox descriptor and a takeover see the paths they always did.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tartarus.errors import InvalidArgument, SandboxFailed, SetupRequired
from tartarus.runtime import ramfile
from tartarus.runtime.qemu import VMConfig, qemu_binary

UIDS_ENV = "TARTARUS_VMM_UIDS"
DEFAULT_UIDS = (1_500_000_000, 65_536)
CLAIMS = Path("/run/tartarus/vmm-uids")
JAIL_DIR = "root"  # the jail's mount point in the sandbox's directory (empty on the host)
# The dynamic loader's and QEMU's own files; no host configuration (/etc) is in the jail.
SYSTEM_DIRS = ("/usr",)
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")
RESOLV_CONF = "/etc/resolv.conf"  # read by QEMU's user networking (libslirp) for its DNS forwarder
_cursor = itertools.count()


@dataclass(frozen=True)
class UidRange:
    start: int
    count: int

    @property
    def shared_gid(self) -> int:
        """The group that may read template files (never a VMM's own id)."""
        return self.start

    def candidates(self) -> Iterator[int]:
        """Every VMM uid once, from where the last claim left off: a freed uid is reused last."""
        first = next(_cursor)
        for k in range(1, self.count):
            yield self.start + 1 + (first + k - 1) % (self.count - 1)


def uid_range() -> UidRange:
    raw = os.environ.get(UIDS_ENV)
    if not raw:
        return UidRange(*DEFAULT_UIDS)
    start_s, _, count_s = raw.partition(":")
    try:
        start, count = int(start_s), int(count_s)
    except ValueError:
        raise InvalidArgument(f"{UIDS_ENV} must be START:COUNT, not {raw!r}") from None
    if start < 1000 or count < 2 or start + count > 0xFFFF_FFFE:
        raise InvalidArgument(f"{UIDS_ENV}={raw}: needs START >= 1000, COUNT >= 2, within 32 bits")
    return UidRange(start, count)


class UidClaim:
    """A uid held for one VMM by an flock; the VMM inherits `fd`, so the claim outlives this object."""

    def __init__(self, uid: int, fd: int) -> None:
        self.uid = uid
        self.fd = fd

    def record(self, pid: int) -> None:
        """Write the VMM's pid into the claim: a VMM that drops its lock (it holds the fd, so it could)
        still keeps its uid from everyone else while it runs (`_held_by_a_live_vmm`)."""
        path = CLAIMS / str(self.uid)
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, str(pid).encode())
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def claim_uid(uids: UidRange) -> UidClaim:
    """A uid no live VMM on this host runs as (whichever daemon or state directory started it)."""
    CLAIMS.mkdir(mode=0o700, parents=True, exist_ok=True)
    for uid in uids.candidates():
        fd = os.open(CLAIMS / str(uid), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        if _held_by_a_live_vmm(fd, uid):
            os.close(fd)
            continue
        return UidClaim(uid, fd)
    raise SandboxFailed(f"all {uids.count - 1} VMM uids of {UIDS_ENV} are in use")


def _held_by_a_live_vmm(fd: int, uid: int) -> bool:
    """The last holder (its pid, in the file) still runs as `uid`: it let go of the lock itself."""
    try:
        pid = int(os.pread(fd, 32, 0) or b"0")
        lines = Path(f"/proc/{pid}/status").read_text().splitlines() if pid > 0 else []
    except (ValueError, OSError):
        return False
    return any(line.startswith("Uid:") and int(line.split()[1]) == uid for line in lines)


def is_claimed(uid: int) -> bool:
    """True while a VMM holds `uid` (for tests and diagnostics)."""
    try:
        fd = os.open(CLAIMS / str(uid), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@dataclass(frozen=True)
class View:
    """What the jail holds: host paths bind-mounted read-only or writable, and host symlinks copied."""

    read_only: tuple[Path, ...]
    writable: tuple[Path, ...]
    links: tuple[Path, ...]


def view(config: VMConfig) -> View:
    """The files `config`'s QEMU opens by path, and nothing else. A template's memory file mapped
    privately is read-only (`tartarus.runtime.ramfile`); a snapshot build's, which it writes, is not."""
    read_only = [*map(Path, SYSTEM_DIRS), *map(Path, DEVICES)]
    if not config.incoming:  # only a booting VM opens them (`qemu.boot_files`)
        read_only += [config.kernel, config.initrd]
    writable: list[Path] = []
    for drive in config.drives:
        (read_only if drive.read_only else writable).append(drive.path)
    if config.memory_file is not None:
        (writable if config.memory_share else read_only).append(config.memory_file)
        if needs_shim(config):
            read_only.append(ramfile.shim_path())
    if config.user_net:  # a template build's user networking forwards DNS to the host's resolvers
        read_only.append(Path(RESOLV_CONF))
    if config.console_log is not None:
        writable.append(config.console_log)
    if config.accel == "kvm":
        writable.append(Path("/dev/kvm"))
    links = tuple(Path(p) for p in ("/bin", "/lib", "/lib64", "/lib32", "/libx32") if os.path.islink(p))
    return View(tuple(read_only), tuple(writable), links)


def needs_shim(config: VMConfig) -> bool:
    """A private memory file, and a QEMU that cannot be told to open it read-only (before 8.2)."""
    return (
        config.memory_file is not None
        and not config.memory_share
        and not ramfile.native_read_only(qemu_binary())
    )


def environment(config: VMConfig) -> dict[str, str]:
    """What the jailed QEMU's environment adds to the daemon's children's: the read-only RAM shim."""
    if config.memory_file is None or not needs_shim(config):
        return {}
    return ramfile.shim_environment(config.memory_file)


def prepare_files(config: VMConfig, uid: int, uids: UidRange) -> None:
    """Give the VMM `uid` what it opens: its own files (writable layer, console log) become its; the
    template's shared files become readable by the shared group, and no VMM's to write: the root
    filesystem and a memory file mapped privately (root's, group read-only). A snapshot build's VMM
    writes its memory file: that one is its own until the build gives it back (`give_back`)."""
    if config.console_log is not None:
        fd = os.open(config.console_log, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        os.chown(config.console_log, uid, uid)
    for drive in config.drives:
        if drive.read_only:
            _share(drive.path, uids.shared_gid, 0o040)
        else:
            os.chown(drive.path, uid, uid)
    if config.memory_file is not None:
        if config.memory_share:  # a snapshot build's: the VMM writes guest RAM into it
            _own_memory_file(config.memory_file, config.memory_mib << 20, uid)
        else:
            _share(config.memory_file, uids.shared_gid, 0o040)


def _own_memory_file(path: Path, size: int, uid: int) -> None:
    """The file a snapshot's VM writes its RAM into, made here (the jail cannot create it) as QEMU
    would have: sparse, of the RAM's size; the VMM's until the build gives it back."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        os.fchown(fd, uid, uid)
    finally:
        os.close(fd)


def give_back(config: VMConfig) -> None:
    """Make the files a build VM wrote (its image or layer, a snapshot's memory file) the daemon's
    again once it has exited: its uid goes to other VMMs next, which must not own a template's files."""
    paths = [d.path for d in config.drives if not d.read_only]
    if config.memory_file is not None and config.memory_share:
        paths.append(config.memory_file)
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.chown(path, os.geteuid(), os.getegid())


def _share(path: Path, gid: int, bits: int) -> None:
    """`path` the daemon's (root's), its group `gid` with exactly the group `bits`."""
    try:
        st = os.stat(path)
    except OSError as e:  # what QEMU would have said had it run: the file it needs is not there
        raise SandboxFailed(f"VMM failed to start: cannot open {path}: {e.strerror}") from e
    if (st.st_uid, st.st_gid) != (os.geteuid(), gid):
        os.chown(path, os.geteuid(), gid)
    if stat.S_IMODE(st.st_mode) & 0o070 != bits:
        os.chmod(path, (stat.S_IMODE(st.st_mode) & ~0o070) | bits)


def kvm_groups(config: VMConfig) -> tuple[int, ...]:
    """/dev/kvm's group, for a KVM guest (the jail keeps the device's host permissions): never root's,
    so a /dev/kvm only root may open is an error to fix on the host (e.g. root:kvm 0660)."""
    return device_groups(os.stat("/dev/kvm")) if config.accel == "kvm" else ()


def device_groups(st: os.stat_result) -> tuple[int, ...]:
    """The group a VMM needs to open the device `st` describes (none if everyone may)."""
    if st.st_mode & 0o006 == 0o006:
        return ()
    if st.st_gid == 0 or st.st_mode & 0o060 != 0o060:
        raise SetupRequired(
            "/dev/kvm is for root only: a jailed VMM needs it group-accessible (root:kvm 0660)"
        )
    return (st.st_gid,)
