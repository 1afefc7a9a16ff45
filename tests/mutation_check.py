"""Guard-mutation check: break each security guard on purpose and prove some test fails.

A security guard nobody tests can be deleted by a refactor with the suite staying green. For every guard
listed in `MUTATIONS` this copies the working tree to a scratch directory, replaces one exact snippet of the
guard with a broken version, runs the tests named for it against the scratch copy and expects them to FAIL
(pytest exit status 1). A mutation the tests survive is reported and the check exits non-zero. The same
tests are first run unmutated and must pass, so a failure is the mutation's doing.

    ./scripts/mutation-check            # every mutation
    ./scripts/mutation-check --list     # names only
    ./scripts/mutation-check auth.missing-key quarantine.release-admin   # a few, by name

Hostile-image tests run the converter inside a throwaway mount namespace with the real root read-only
(tests/images), so a broken path guard in the scratch copy cannot write the machine's files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", "results", "build"
)


@dataclass(frozen=True)
class Mutation:
    name: str
    guard: str  # what the guard protects, for the report
    path: str  # relative to the repository root
    find: str  # must occur exactly once in the file
    replace: str
    tests: tuple[str, ...]  # pytest node ids or paths; at least one must fail


API = "src/tartarus/daemon/app.py"
SANDBOXES = "src/tartarus/daemon/routes/sandboxes.py"
CHECKPOINTS = "src/tartarus/daemon/routes/checkpoints.py"
IMAGES = "src/tartarus/daemon/routes/images.py"
CONTROL = "src/tartarus/daemon/control.py"
PORTS_VM = "tests/network/test_exposed_ports.py::"
GVISOR_CONTAINMENT = "tests/gvisor/test_containment.py::"
DOTDOT_TAIL = "                        os.close(fds.pop())"
ADMIN_ROUTES = "tests/api/test_auth.py::test_every_admin_route_refuses_a_tenant_key_even_on_its_own_sandbox"
GATE = "src/tartarus/daemon/gate.py"
HARDENING = "tests/api/test_hardening.py::"
AGENT_UNIT = "tests/unit/test_agent_client.py"
QUOTAS = "tests/api/test_quota_bypass.py::"
RESOURCES = "tests/api/test_resource_tenancy.py::"
STATE_VM = "tests/api/test_state_private.py::test_state_dir_is_private_and_env_is_sealed"

MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "tenancy.may-touch",
        "a tenant reaches only its own sandboxes (404 for others')",
        CONTROL,
        "return record is not None and record.tenant == principal.tenant",
        "return True",
        ("tests/api/test_tenancy.py::test_a_tenant_sees_and_touches_only_its_own_sandboxes",),
    ),
    Mutation(
        "tenancy.list",
        "a tenant lists only its own live sandboxes",
        CONTROL,
        "if not principal.admin:\n            tenant = principal.tenant\n        shown = []",
        "shown = []",
        ("tests/api/test_tenancy.py::test_a_tenant_sees_and_touches_only_its_own_sandboxes",),
    ),
    Mutation(
        "admin.gc",
        "gc is an admin route",
        CHECKPOINTS,
        '@router.post("/v1/gc", response_model=GcResult, dependencies=AdminOnly)',
        '@router.post("/v1/gc", response_model=GcResult)',
        (ADMIN_ROUTES,),
    ),
    Mutation(
        "admin.images-pull",
        "converting registry images is an admin route",
        IMAGES,
        "    dependencies=AdminOnly,\n)\nasync def pull_image",
        ")\nasync def pull_image",
        (ADMIN_ROUTES,),
    ),
    Mutation(
        "admin.role",
        "a tenant key is not an admin key",
        "src/tartarus/daemon/auth.py",
        "if not self.admin:\n            raise PermissionDenied",
        "if False:\n            raise PermissionDenied",
        ("tests/api/test_auth.py::test_tenant_keys_cannot_administer",),
    ),
    Mutation(
        "quota.check",
        "a create beyond a tenant's quota is refused",
        "src/tartarus/daemon/quotas.py",
        "if limit is not None and wanted > 0 and used + wanted > limit:",
        "if False:",
        ("tests/api/test_tenancy.py::test_quota_refuses_creates_beyond_the_limit_with_a_clear_error",),
    ),
    Mutation(
        "quota.fork",
        "a fork is admitted against the quota for all its copies",
        SANDBOXES,
        "quotas.Usage(n, n * source.vcpus, n * source.memory_mib)",
        "quotas.Usage()",
        ("tests/api/test_fork_quota.py::test_a_fork_beyond_the_sandbox_quota_is_refused_and_makes_nothing",),
    ),
    Mutation(
        "quota.from-checkpoint",
        "a start from a checkpoint is admitted against the quota",
        CHECKPOINTS,
        "quotas.Usage(1, saved.vcpus, saved.memory_mib)",
        "quotas.Usage()",
        ("tests/api/test_fork_quota.py::test_a_start_from_a_checkpoint_beyond_the_quota_is_refused",),
    ),
    Mutation(
        "ports.token",
        "a secure exposed port refuses a connection without the traffic token",
        "src/tartarus/network/expose.py",
        "if traffic.token_ok(head, token):",
        "if True:",
        (PORTS_VM + "test_a_secure_port_answers_403_without_the_token_and_never_wakes_the_sandbox",),
    ),
    Mutation(
        "ports.no-wake-before-token",
        "an unauthenticated connection never reaches (wakes) the guest",
        "src/tartarus/network/expose.py",
        'first = b""\n',
        'first = b""\n            async with self.target():\n                pass\n',
        (PORTS_VM + "test_a_secure_port_answers_403_without_the_token_and_never_wakes_the_sandbox",),
    ),
    Mutation(
        "ports.cap-sandbox",
        "exposed ports per sandbox are capped",
        "src/tartarus/daemon/ports.py",
        "if have >= b.ports_per_sandbox:",
        "if False:",
        (PORTS_VM + "test_exposed_ports_are_capped_per_sandbox_and_per_tenant_and_creates_still_work",),
    ),
    Mutation(
        "ports.cap-tenant",
        "exposed ports per tenant are capped",
        "src/tartarus/daemon/ports.py",
        "if tenant_has >= b.ports_per_tenant:",
        "if False:",
        (PORTS_VM + "test_exposed_ports_are_capped_per_sandbox_and_per_tenant_and_creates_still_work",),
    ),
    Mutation(
        "ports.connections",
        "connections in progress to exposed ports are bounded (no fd exhaustion)",
        "src/tartarus/daemon/ports.py",
        "if any(self._connections[k] >= limit",
        "if False and any(self._connections[k] >= limit",
        ("tests/unit/test_expose.py",),
    ),
    Mutation(
        "state.private-root",
        "the state dir is made 0700 and an older tree tightened on start",
        "src/tartarus/daemon/recovery.py",
        "make_private(self.state_dir)  #",
        "self.state_dir.mkdir(parents=True, exist_ok=True)  #",
        (STATE_VM,),
    ),
    Mutation(
        "state.private-files",
        "files the daemon writes in the state dir are 0600",
        "src/tartarus/private.py",
        "return os.open(path, flags | os.O_CLOEXEC, PRIVATE_FILE)",
        "return os.open(path, flags | os.O_CLOEXEC, 0o644)",
        (STATE_VM,),
    ),
    Mutation(
        # A jailed VMM (the daemon runs as root) writes only files the daemon made for it, so QEMU's own
        # umask (private.QEMU_UMASK) no longer decides their modes: the jail's creation mode does.
        "state.vmm-console-private",
        "what QEMU writes in a sandbox's directory is private",
        "src/tartarus/runtime/jail.py",
        "os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)",
        "os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)",
        (STATE_VM,),
    ),
    Mutation(
        "state.layer-private",
        "a sandbox's writable layer (guest data) is 0600",
        "src/tartarus/runtime/disks.py",
        'open(dst, "xb", opener=opener)',
        'open(dst, "xb")',
        (STATE_VM,),
    ),
    Mutation(
        "state.env-sealed-descriptor",
        "sandbox.json keeps the env sealed, not in plaintext",
        "src/tartarus/sandbox/descriptor.py",
        '"env": seal.seal(dict(sandbox.spec.env), sandbox.id)',
        '"env": dict(sandbox.spec.env)',
        (STATE_VM,),
    ),
    Mutation(
        "state.env-sealed-image",
        "hibernation and checkpoint records keep the env sealed",
        "src/tartarus/sandbox/saved.py",
        '"env": seal.seal(dict(self.env), self.sandbox_id)',
        '"env": dict(self.env)',
        (STATE_VM,),
    ),
    Mutation(
        "hibernation.wake-waits-for-commit",
        "a woken guest does not run before its wake commits (a hibernation's device state says running)",
        "src/tartarus/runtime/qemu.py",
        'argv += ["-S", "-incoming", "defer"]',
        'argv += ["-incoming", "defer"]',
        ("tests/vm/test_hibernation_pages.py::test_owned_pages_come_back_exactly",),
    ),
    Mutation(
        "tenancy.checkpoint-get",
        "a tenant gets, restores and deletes only its own checkpoints",
        CHECKPOINTS,
        "if not principal.admin and saved.spec.tenant != principal.tenant:",
        "if False:",
        (RESOURCES + "test_a_tenant_uses_only_its_own_checkpoints",),
    ),
    Mutation(
        "tenancy.checkpoint-list",
        "a tenant lists only its own checkpoints",
        CHECKPOINTS,
        "i for i in manager.checkpoints() if caller.admin or i.spec.tenant == caller.tenant",
        "i for i in manager.checkpoints()",
        (RESOURCES + "test_a_tenant_uses_only_its_own_checkpoints",),
    ),
    Mutation(
        "tenancy.ended",
        "a tenant sees only its own ended sandboxes",
        CONTROL,
        "        if not principal.admin:\n            tenant = principal.tenant\n"
        "        rows = await self.db(self.store.list_sandboxes, tenant=tenant, live=False)",
        "        rows = await self.db(self.store.list_sandboxes, tenant=tenant, live=False)",
        (RESOURCES + "test_ended_sandboxes_are_listed_only_to_their_tenant",),
    ),
    Mutation(
        "images.dotdot-at-root",
        "a hostile layer's .. at the image root stays at the root",
        "src/tartarus/images/layers.py",
        '                if part == "..":\n                    if fds:\n' + DOTDOT_TAIL,
        '                if part == ".." and fds:\n                    if fds:\n' + DOTDOT_TAIL,
        (
            "tests/images/test_layers.py::"
            "test_dotdot_at_the_root_stays_at_the_root_whatever_the_number_of_levels",
            "tests/images/test_layers.py::test_writing_through_a_symlink_that_points_outside_stays_inside",
        ),
    ),
    Mutation(
        "guest.seed",
        "every restore sends the guest a fresh random seed",
        "src/tartarus/sandbox/sandbox.py",
        "entropy=os.urandom(64),",
        "entropy=bytes(64),",
        ("tests/vm/test_entropy.py",),
    ),
    Mutation(
        "ready.alive",
        "a ready sandbox whose VMM died is never handed out",
        "src/tartarus/snapshots/ready.py",
        "            if sandbox.alive:\n",
        "            if True:\n",
        (
            "tests/vm/test_ready_pool.py::test_a_ready_sandbox_whose_vmm_died_is_not_handed_out",
            "tests/gvisor/test_ready_pool.py::test_a_pooled_gvisor_sandbox_whose_container_died_is_not_handed_out",
        ),
    ),
    Mutation(
        "ready.quarantine",
        "a quarantined create never gets a ready sandbox (it has run before its gate could close)",
        "src/tartarus/daemon/lifecycle.py",
        "        if admission.decision.quarantined:\n            pool.decline()\n            return None\n",
        "",
        (
            "tests/network/test_ready_pool_network.py::test_a_quarantined_create_never_gets_a_ready_sandbox",
            "tests/network/test_gvisor_ready_network.py::test_a_quarantined_gvisor_create_never_gets_a_ready_sandbox",
        ),
    ),
    Mutation(
        "quarantine.cut",
        "a quarantine cuts the sandbox's traffic at once",
        "src/tartarus/network/sandbox.py",
        "        self._ctx().run(nft.close_gate())",
        "        pass",
        ("tests/network/test_quarantine.py::test_live_quarantine_cuts_a_sending_connection_at_once",),
    ),
    Mutation(
        "limits.ttl",
        "a sandbox lives no shorter than its TTL",
        "src/tartarus/daemon/schedulers.py",
        "self._deadlines.schedule(id_, seconds, lambda: self._expire(id_))",
        "self._deadlines.schedule(id_, seconds * 0.5, lambda: self._expire(id_))",
        ("tests/limits/test_limits.py::test_ttl_destroys_on_time_and_says_why",),
    ),
    Mutation(
        "crash.wake-recovery",
        "a daemon killed as a wake commits leaves the sandbox hibernated, not deleted",
        "src/tartarus/daemon/recovery.py",
        "restored, lost = capture.recover_wakes(self.layout)",
        "restored, lost = [], []",
        ("tests/vm/test_hibernation_crash.py::test_daemon_killed_when_wake_commits_leaves_it_hibernated",),
    ),
    Mutation(
        "crash.resumed-marker",
        "a wake whose guest may have run is never rolled back to its stale image",
        "src/tartarus/sandbox/capture.py",
        "if whole and not (waking / RESUMED).exists() and not target.exists():",
        "if whole and not target.exists():",
        ("tests/unit/test_wake_recovery.py",),
    ),
    Mutation(
        "quota.wake",
        "every wake (explicit, implicit, through a port) is admitted against the owner's quota",
        "src/tartarus/daemon/lifecycle.py",
        "async with self.admit_wake(record):",
        "async with contextlib.nullcontext():",
        (QUOTAS + "test_a_wake_is_admitted_against_the_quota_like_a_create",),
    ),
    Mutation(
        "store.follows-table",
        "the stored record of a sandbox follows each change the table tells of (nothing polls)",
        CONTROL,
        "self.manager.table.on_change = self.stored.changed",
        "pass",
        ("tests/unit/test_table_events.py",),
    ),
    Mutation(
        "quota.timeout",
        "PUT /timeout is capped by the policy's max_ttl_s like a create",
        "src/tartarus/daemon/records.py",
        "timeout = capped_timeout(timeout, self.manager.policy.policy.limits)",
        "pass",
        (QUOTAS + "test_a_new_timeout_is_capped_by_the_policy_like_a_create",),
    ),
    Mutation(
        "quota.checkpoints",
        "checkpoints count against the tenant's max_checkpoints",
        CHECKPOINTS,
        "async with control.admitted(tenant, quotas.Usage(checkpoints=1)):",
        "async with contextlib.nullcontext():",
        (QUOTAS + "test_checkpoints_count_against_the_tenant_quota",),
    ),
    Mutation(
        "quota.checkpoint-ttl",
        "a checkpoint gets the policy's TTL",
        "src/tartarus/daemon/lifecycle.py",
        "ttl = checkpoint_ttl(ttl, self.policy.policy.limits)",
        "pass",
        (QUOTAS + "test_a_checkpoint_gets_the_policy_ttl_and_is_deleted_when_it_expires",),
    ),
    Mutation(
        "quota.hibernation-disk",
        "the hibernation disk quota is on by default",
        "src/tartarus/daemon/config.py",
        "return DEFAULT_HIBERNATE_QUOTA_MIB * 2**20",
        "return None",
        (QUOTAS + "test_the_hibernation_disk_quota_is_on_by_default",),
    ),
    Mutation(
        "quarantine.release-admin",
        "only an operator (admin key) lifts a quarantine",
        SANDBOXES,
        "    dependencies=AdminOnly,\n)\nasync def release_sandbox",
        ")\nasync def release_sandbox",
        (HARDENING + "test_only_an_admin_can_quarantine_or_release_and_the_record_names_who",),
    ),
    Mutation(
        "quarantine.verdict-admin",
        "only an operator (admin key) quarantines",
        SANDBOXES,
        "    dependencies=AdminOnly,\n)\nasync def quarantine_sandbox",
        ")\nasync def quarantine_sandbox",
        (HARDENING + "test_only_an_admin_can_quarantine_or_release_and_the_record_names_who",),
    ),
    Mutation(
        "quarantine.audit-names-who",
        "a verdict's record names the key and tenant that gave it",
        SANDBOXES,
        'return f"operator:{principal.key_id}@{principal.tenant}"',
        'return "operator"',
        (HARDENING + "test_only_an_admin_can_quarantine_or_release_and_the_record_names_who",),
    ),
    Mutation(
        "auth.before-body",
        "a request's key is checked before its body is read",
        GATE,
        'if scope["path"] not in self.public:',
        "if False:",
        (HARDENING + "test_a_keyless_request_is_refused_before_its_body_is_read",),
    ),
    Mutation(
        "auth.body-limit-declared",
        "a JSON body declared larger than its route's limit is refused unread",
        GATE,
        "and int(declared) > limit:",
        "and False:",
        (HARDENING + "test_an_oversized_json_body_is_refused_with_413",),
    ),
    Mutation(
        "auth.body-limit-streamed",
        "a JSON body is never held past its route's limit",
        GATE,
        "if len(body) > limit:",
        "if False:",
        (HARDENING + "test_an_oversized_json_body_is_refused_with_413",),
    ),
    Mutation(
        "auth.socket-mode",
        "the API's unix socket is the daemon user's only",
        "src/tartarus/daemon/server.py",
        "SOCKET_MODE = 0o600",
        "SOCKET_MODE = 0o666",
        (HARDENING + "test_the_api_socket_is_private_to_the_daemon_user",),
    ),
    Mutation(
        "audit.authenticated-only",
        "anonymous requests write nothing to the audit trail",
        "src/tartarus/daemon/requests.py",
        "        if principal is None:\n            return\n",
        "",
        (HARDENING + "test_anonymous_requests_leave_no_audit_trail",),
    ),
    Mutation(
        "audit.verdicts-synced",
        "keys, tenants, tokens and verdicts are fsynced before they are answered",
        "src/tartarus/daemon/requests.py",
        "return route.endswith(VERDICTS) or not route.startswith(SANDBOX_WORK)",
        "return not route.startswith(SANDBOX_WORK)",
        (
            "tests/unit/test_control_units.py::test_credentials_tenancy_and_verdicts_are_fsynced_before_they_are_answered",
        ),
    ),
    Mutation(
        "audit.group-commit-waits",
        "a caller waiting for its audit line's fsync is told only once that fsync is done",
        "src/tartarus/audit.py",
        "            if self._synced >= line:\n",
        "            if True:\n",
        ("tests/unit/test_control_units.py::test_audit_lines_are_written_at_once_and_fsynced_in_groups",),
    ),
    Mutation(
        "errors.no-exception-text",
        "a 500 does not echo exception text (host paths) to the caller",
        API,
        """(f"internal error (request {rid}): see the daemon's log")""",
        """(f"internal error (request {rid}): {__import__('sys').exc_info()[1]}")""",
        (HARDENING + "test_an_internal_error_names_the_request_not_the_exception",),
    ),
    Mutation(
        "images.paths-admin-only",
        "image listings show host paths to admin keys only",
        IMAGES,
        "if not admin:",
        "if False:",
        (HARDENING + "test_image_listing_shows_host_paths_to_admins_only",),
    ),
    Mutation(
        "files.list-bounded",
        "a directory listing is bounded in the daemon",
        "src/tartarus/runtime/agent.py",
        "if limit is None or len(entries) < limit:",
        "if True:",
        (HARDENING + "test_a_directory_listing_is_bounded",),
    ),
    Mutation(
        "streams.tenant-limit",
        "a tenant's open streaming calls are limited",
        CONTROL,
        "if self._streams[tenant] >= MAX_TENANT_STREAMS:",
        "if False:",
        ("tests/api/test_stream_limits.py",),
    ),
    Mutation(
        "streams.per-stream-bound",
        "one stream's queued guest output is bounded in bytes",
        "src/tartarus/runtime/flow.py",
        "if self.queued + size > STREAM_BUFFER or self._budget.queued + size > self._budget.limit:",
        "if self._budget.queued + size > self._budget.limit:",
        (AGENT_UNIT,),
    ),
    Mutation(
        "streams.sandbox-bound",
        "all streams of a sandbox together are bounded in bytes",
        "src/tartarus/runtime/flow.py",
        "if self.queued + size > STREAM_BUFFER or self._budget.queued + size > self._budget.limit:",
        "if self.queued + size > STREAM_BUFFER:",
        (AGENT_UNIT,),
    ),
    Mutation(
        "streams.per-sandbox-count",
        "concurrent streams per sandbox are limited",
        "src/tartarus/runtime/agent.py",
        "if stream and len(self._streams) >= MAX_STREAMS:",
        "if False:",
        (AGENT_UNIT,),
    ),
    Mutation(
        "streams.abandon-detaches",
        "an abandoned stream is detached in the guest and its memory freed",
        "src/tartarus/runtime/agent.py",
        "if self.exit is None:\n            self._client._detach(self._id)",
        "if self.exit is None:\n            self._client._done(self._id)",
        (AGENT_UNIT,),
    ),
    Mutation(
        "streams.guest-honours-credit",
        "the guest agent sends no more than its credit",
        "agent/requests.c",
        "if (r->credit < 0 || r->detached)\n\t\treturn max;",
        "return max;",
        ("tests/unit/test_agent_flow.py",),
    ),
    Mutation(
        "processes.own-not-addressable",
        "a client cannot attach to, feed or signal the sandbox's own processes (interpreter, start command)",
        "agent/requests.c",
        "r->kind == R_EXEC && r->pid == pid && !r->reaped && r->id < RESERVED_IDS",
        "r->kind == R_EXEC && r->pid == pid && !r->reaped",
        ("tests/unit/test_agent_processes.py::test_unknown_closed_and_reserved_commands_are_refused",),
    ),
    Mutation(
        "watch.agent-bound",
        "the guest agent runs at most 16 directory watches at once",
        "agent/watch.c",
        "if (watches >= MAX_WATCHES) {",
        "if (0) {",
        ("tests/unit/test_agent_watch.py::test_watching_what_is_not_a_directory_is_refused",),
    ),
    Mutation(
        "watch.events-within-credit",
        "a watch drops the events its credit does not cover (marked by an overflow event), never queues them",
        "agent/watch.c",
        "if (sendable(r, cost) < cost) {",
        "if (0) {",
        ("tests/unit/test_agent_watch.py::test_a_watch_without_credit_drops_events_and_says_so",),
    ),
    Mutation(
        "watch.e2b-watchers-bound",
        "an E2B client holds at most 8 polled watchers per sandbox",
        "src/tartarus/e2b/watchers.py",
        "if sum(w.sandbox_id == sandbox_id for w in self._by_id.values()) >= MAX_WATCHERS:",
        "if False:",
        ("tests/unit/test_e2b_watch.py::test_watchers_are_bounded_per_sandbox_polled_and_removed",),
    ),
    Mutation(
        "watch.e2b-queue-bound",
        "a polled watcher nobody polls keeps a bounded queue",
        "src/tartarus/e2b/watchers.py",
        "if len(self.queue) >= MAX_QUEUED:",
        "if False:",
        (
            "tests/unit/test_e2b_watch.py::test_a_polled_watcher_keeps_a_bounded_queue_and_marks_what_it_dropped",
        ),
    ),
    Mutation(
        "processes.input-bound",
        "the agent refuses an INPUT field over 64 KiB",
        "agent/frame.c",
        "tag == F_INPUT ? INPUT_MAX : PATH_MAX - 1",
        "tag == F_INPUT ? MAX_LIST_LEN : PATH_MAX - 1",
        ("tests/unit/test_agent_processes.py::test_hostile_frames_get_errors_not_crashes",),
    ),
    Mutation(
        "processes.host-list-bound",
        "a guest cannot grow the host's list of its commands without end",
        "src/tartarus/runtime/agent.py",
        "if len(found) >= MAX_PROCS:",
        "if False:",
        (
            "tests/unit/test_agent_processes.py::test_a_guest_listing_more_commands_than_it_can_run_fails_the_call",
        ),
    ),
    Mutation(
        "cluster.capacity",
        "placement never reserves more sandbox slots than a node has, under concurrent placers",
        "src/tartarus/cluster/placement.py",
        "            AND used.slots + 1 <= n.slots\n",
        "\n",
        ("tests/cluster/test_placement.py::test_concurrent_placements_never_exceed_capacity",),
    ),
    Mutation(
        "cluster.fencing",
        "a node whose lease lapsed cannot renew it (it is fenced)",
        "src/tartarus/cluster/membership.py",
        "WHERE name = %s AND epoch = %s AND state = 'up' AND lease_expires_at > now() ",
        "WHERE name = %s AND epoch = %s AND state = 'up' ",
        (
            "tests/cluster/test_membership.py::test_a_lapsed_lease_is_fenced_and_re_registering_gives_a_new_epoch",
        ),
    ),
    Mutation(
        "cluster.confirm-epoch",
        "a reservation made under an old epoch cannot be confirmed",
        "src/tartarus/cluster/placement.py",
        "AND n.name = p.node AND n.epoch = p.epoch",
        "AND n.name = p.node",
        ("tests/cluster/test_placement.py::test_a_confirm_after_the_node_was_fenced_is_refused",),
    ),
    Mutation(
        "roles.agent-token",
        "an agent serves only callers presenting the shared agent token",
        "src/tartarus/roles/agent.py",
        "        if not self.token.admits(authorization):\n",
        "        if False:\n",
        ("tests/cluster/test_roles.py::test_an_agent_serves_only_gateways",),
    ),
    Mutation(
        "roles.gateway-metrics-admin",
        "a gateway's metrics (every tenant's traffic, the nodes) are served to admin keys only",
        "src/tartarus/roles/gateway.py",
        "(await self.authenticate(request)).require_admin()",
        "await self.authenticate(request)",
        ("tests/cluster/test_metrics.py::test_roles_export_cluster_metrics_and_audit_every_decision",),
    ),
    Mutation(
        "roles.agent-metrics-key",
        "an agent's /metrics without the agent token needs a valid API key from the shared store",
        "src/tartarus/roles/agent.py",
        "principal, _ = await ControlPlane.authenticate(self.control, authorization)",
        'principal = Principal("scraper", "local", True)',
        ("tests/cluster/test_metrics.py::test_roles_export_cluster_metrics_and_audit_every_decision",),
    ),
    Mutation(
        "roles.fenced-kill",
        "a fenced agent kills the sandboxes the cluster gave up on before serving again",
        "src/tartarus/roles/agent.py",
        "        for sandbox_id in registration.kill:\n",
        "        for sandbox_id in ():\n",
        (
            "tests/cluster/test_roles.py::test_a_fenced_agent_kills_what_the_cluster_gave_up_and_registers_again",
        ),
    ),
    Mutation(
        "roles.cluster-quota",
        "a tenant's quota holds over every node of the cluster, not per node",
        "src/tartarus/roles/quota.py",
        "quotas.check(tenant, limits, usage, quotas.Usage(1, demand.vcpus, demand.memory_mib))",
        "pass",
        ("tests/cluster/test_roles.py::test_a_tenant_quota_holds_over_the_whole_cluster",),
    ),
    Mutation(
        "roles.quarantine-placement",
        "a sandbox the policy quarantines is placed only on quarantine-labelled nodes",
        "src/tartarus/roles/gateway.py",
        'demand = _demand(data, quarantine=verdict == "quarantine")',
        "demand = _demand(data)",
        ("tests/cluster/test_roles.py::test_a_quarantine_verdict_lands_only_on_quarantine_capacity",),
    ),
    Mutation(
        "cluster.partition-fencing",
        "a partitioned agent's lease renewals fail within a renewal interval, not hang on the cut connection",
        "src/tartarus/cluster/lease.py",
        "self._conn = connect(self.url, timeout_s=interval, unacked_s=interval)",
        "self._conn = connect(self.url, timeout_s=interval)",
        ("tests/cluster/test_roles.py::test_a_partitioned_node_is_given_up_and_fenced_when_it_heals",),
    ),
    Mutation(
        "roles.node-lost",
        "a call for a sandbox whose node was lost is answered node_lost, naming the node",
        "src/tartarus/roles/gateway.py",
        "if where.state == PlacementState.LOST:",
        "if False:",
        ("tests/cluster/test_roles.py::test_a_sandbox_of_a_killed_agent_gets_a_clear_lost_node_error",),
    ),
    Mutation(
        "cluster.one-waker",
        "a sandbox's wake takes its placement row only while it is hibernated: two wakes never both reserve",
        "src/tartarus/cluster/placement.py",
        "WHERE p.state = 'hibernated' OR (p.state = 'reserved' AND p.reserved_until <= now())",
        "WHERE true",
        (
            "tests/cluster/test_placement.py::test_a_stored_sandbox_has_one_waker_and_its_capture_survives_a_failed_wake",
        ),
    ),
    Mutation(
        "cluster.stored-outlives-its-node",
        "a lost node's sandboxes hibernated in the object store stay wakeable elsewhere",
        "src/tartarus/cluster/reconcile.py",
        "WHERE node = %s AND state IN ('running', 'reserved') RETURNING sandbox_id",
        "WHERE node = %s AND state IN ('running', 'reserved', 'hibernated') RETURNING sandbox_id",
        (
            "tests/cluster/test_membership.py::test_a_node_lapsed_past_grace_is_lost_with_its_running_sandboxes",
        ),
    ),
    Mutation(
        "cluster.checkpoint-tenant",
        "a tenant finds only its own checkpoints in the cluster",
        "src/tartarus/cluster/checkpoints.py",
        'cluster.checkpoints WHERE id = %s AND (%s::text IS NULL OR tenant = %s)",',
        'cluster.checkpoints WHERE id = %s AND (%s::text IS NULL OR tenant = %s OR true)",',
        (
            "tests/cluster/test_checkpoint_records.py::test_a_tenant_sees_and_deletes_only_its_own_checkpoints",
        ),
    ),
    Mutation(
        "roles.checkpoint-capture-fault",
        "a checkpoint whose capture fails its checks is answered as such, not taken for a node's failure",
        "src/tartarus/roles/gateway_checkpoints.py",
        "                raise Answered(fetched)\n",
        "                raise NodeRefused(fetched.text)\n",
        (
            "tests/cluster/test_stored_checkpoints.py::test_a_corrupt_or_missing_chunk_is_a_clear_error_and_leaves_nothing",
        ),
    ),
    Mutation(
        "roles.snapshot-fetch",
        "an agent without a template's snapshot fetches the one in the object store before it registers",
        "src/tartarus/roles/agent.py",
        "got = await self._loop.run_in_executor(None, self.sync.snapshots.fetch_missing)",
        "got: list[str] = []",
        (
            "tests/cluster/test_stored_checkpoints.py::test_a_node_without_the_template_snapshot_fetches_it_from_the_store",
        ),
    ),
    Mutation(
        "cluster.collect-named",
        "collecting the object store keeps the captures a stored sandbox or a checkpoint still names",
        "src/tartarus/cluster/collect.py",
        "if capture in live or capture.startswith(SNAPSHOTS) or not old(at):",
        "if capture.startswith(SNAPSHOTS) or not old(at):",
        ("tests/cluster/test_collect.py::test_unnamed_captures_and_their_own_chunks_are_collected",),
    ),
    Mutation(
        "roles.wake-confirm",
        "an agent keeps a sandbox it woke from the object store only once it confirmed the reservation",
        "src/tartarus/roles/stored.py",
        "            await loop.run_in_executor(self._pool, self._in_db, _confirm, saved.id, lease, cost)\n",
        "\n",
        ("tests/cluster/test_stored.py::test_an_agent_keeps_a_wake_only_under_a_reservation_it_holds",),
    ),
    Mutation(
        "roles.wake-epoch",
        "an agent wakes a stored sandbox only under its own epoch (the reservation's)",
        "src/tartarus/roles/stored.py",
        "if lease is None or lease.epoch != request.epoch:",
        "if lease is None:",
        ("tests/cluster/test_stored.py::test_an_agent_keeps_a_wake_only_under_a_reservation_it_holds",),
    ),
    Mutation(
        "cluster.chunk-integrity",
        "a downloaded chunk whose content does not match its SHA-256 is refused",
        "src/tartarus/cluster/chunks.py",
        "if len(raw) != ref.size or hashlib.sha256(raw).hexdigest() != ref.digest:",
        "if len(raw) != ref.size:",
        ("tests/unit/test_cluster_chunks.py::test_unseal_refuses_garbage_and_a_valid_blob_of_other_content",),
    ),
    Mutation(
        "e2b.access-token",
        "an E2B data-plane request reaches the daemon only with a token of the sandbox it is routed to",
        "src/tartarus/e2b/tokens.py",
        "return token if token is not None and token.startswith(prefix) else None",
        "return token",
        ("tests/unit/test_e2b_routing.py",),
    ),
    Mutation(
        "e2b.traffic-token-port",
        "the traffic token (sent by the code interpreter's SDK) opens the interpreter's port, never envd",
        "src/tartarus/e2b/tokens.py",
        "    if where.port == INTERPRETER_PORT:\n",
        "    if where.port > 0:\n",
        ("tests/unit/test_e2b_interpreter.py",),
    ),
    Mutation(
        "scoped.token-per-sandbox",
        "a sandbox-scoped token opens its one sandbox of its one tenant, in its one scope",
        "src/tartarus/daemon/scoped.py",
        'message = f"{scope}\\0{sandbox_id}\\0{tenant}".encode()',
        'message = f"{scope}\\0{tenant}".encode()',
        ("tests/unit/test_scoped_tokens.py",),
    ),
    Mutation(
        "scoped.own-sandbox",
        "a sandbox-scoped credential's calls stay on its own sandbox",
        "src/tartarus/daemon/scoped.py",
        'if call is None or call["id"] != self.sandbox_id:',
        "if call is None:",
        ("tests/unit/test_scoped_tokens.py",),
    ),
    Mutation(
        "scoped.confined",
        "the daemon refuses a sandbox-scoped credential anything outside its scope (the control plane)",
        "src/tartarus/daemon/gate.py",
        "if principal.scope is not None and not principal.scope.allows(",
        "if principal.scope is None and not principal.scope.allows(",
        ("tests/api/test_scoped_tokens.py",),
    ),
    Mutation(
        "scoped.signature",
        "a signed file URL opens its sandbox only with a signature made with that sandbox's token",
        "src/tartarus/daemon/scoped.py",
        'if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):',
        "if False:",
        ("tests/unit/test_scoped_tokens.py",),
    ),
    Mutation(
        "vmm.seccomp",
        "every VMM runs under QEMU's seccomp filter",
        "src/tartarus/runtime/qemu.py",
        '        "-sandbox",\n'
        '        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",\n',
        "",
        ("tests/vm/test_vmm_confinement.py",),
    ),
    Mutation(
        "vmm.jail",
        "every sandbox's VMM runs jailed: its own uid, its own filesystem view",
        "src/tartarus/sandbox/sandbox.py",
        "config.jail = os.geteuid() == 0\n",
        "config.jail = False\n",
        ("tests/vm/test_vmm_confinement.py::test_each_vmm_is_jailed_as_its_own_uid_through_wake_and_fork",),
    ),
    Mutation(
        "vmm.memory-file-mode",
        "a template's memory file is root's and read-only to its VMMs' group",
        "src/tartarus/runtime/jail.py",
        "_share(config.memory_file, uids.shared_gid, 0o040)",
        "_share(config.memory_file, uids.shared_gid, 0o060)",
        ("tests/vm/test_vmm_confinement.py::test_each_vmm_is_jailed_as_its_own_uid_through_wake_and_fork",),
    ),
    Mutation(
        "vmm.memory-file-mount",
        "a template's memory file is bind-mounted read-only in its VMMs' jails",
        "src/tartarus/runtime/jail.py",
        "(writable if config.memory_share else read_only).append(config.memory_file)",
        "writable.append(config.memory_file)",
        ("tests/vm/test_vmm_confinement.py::test_each_vmm_is_jailed_as_its_own_uid_through_wake_and_fork",),
    ),
    Mutation(
        "vmm.build-jail",
        "a template's build VM runs jailed (its own uid, its own view)",
        "src/tartarus/templates/steps.py",
        "config.jail = os.geteuid() == 0",
        "config.jail = False",
        ("tests/images/test_build_vm_jail.py",),
    ),
    Mutation(
        "vmm.build-give-back",
        "what a build VM wrote (image, snapshot memory and layer) is the daemon's again, no VMM uid's",
        "src/tartarus/snapshots/build.py",
        "            jail.give_back(config)",
        "            pass",
        ("tests/images/test_build_vm_jail.py",),
    ),
    Mutation(
        "vmm.namespace-output",
        "what a sandbox namespace's own processes (an escaped VMM) send never leaves by its uplink",
        "src/tartarus/network/nft.py",
        '    oifname "{UPLINK}" drop\n',
        "",
        (
            "tests/vm/test_vmm_confinement.py::"
            "test_a_process_in_the_vmms_network_namespace_sends_nothing_out_of_its_uplink",
        ),
    ),
    Mutation(
        "vmm.uid-claim",
        "a VMM uid that another VMM holds is never claimed",
        "src/tartarus/runtime/jail.py",
        "        except BlockingIOError:\n            os.close(fd)\n            continue\n",
        "        except BlockingIOError:\n            pass\n",
        ("tests/unit/test_vmm_jail.py",),
    ),
    Mutation(
        "vmm.uid-held",
        "a VMM that let go of its uid's lock keeps the uid while it runs",
        "src/tartarus/runtime/jail.py",
        "if _held_by_a_live_vmm(fd, uid):",
        "if False:",
        ("tests/unit/test_vmm_jail.py",),
    ),
    Mutation(
        "images.worker-seal",
        "the conversion worker can write only its own output",
        "src/tartarus/images/worker.py",
        'seal_all_but(Path(job["workdir"]))',
        "None",
        ("tests/images/test_worker_seal.py",),
    ),
    Mutation(
        "quarantine.disk-clamp",
        "a quarantine lowers the sandbox's disk bandwidth",
        "src/tartarus/sandbox/sandbox.py",
        "await throttle_disks(self.vm, own.tightened(confinement.bandwidth))",
        "await throttle_disks(self.vm, own)",
        (
            "tests/limits/test_bandwidth.py::test_quarantine_lowers_the_disk_rate_live_and_release_restores_it",
        ),
    ),
    Mutation(
        "policy.backend-rule",
        "a policy rule on the backend keeps tenants off gVisor",
        "src/tartarus/policy/engine.py",
        "if self.backend is not None and req.backend not in self.backend:",
        "if False:",
        ("tests/unit/test_backend_choice.py",),
    ),
    Mutation(
        "gvisor.unenforced-refused",
        "a gVisor create asking for a limit nothing enforces on it yet is refused, not run without it",
        "src/tartarus/sandbox/choice.py",
        'asked = {"max_processes": spec.max_processes, "disk_mib": spec.disk_mib}',
        "asked: dict[str, int | None] = {}",
        ("tests/unit/test_backend_choice.py",),
    ),
    Mutation(
        "gvisor.contained",
        "a gVisor sandbox made through the daemon runs in its network and cgroups, not beside them",
        "src/tartarus/sandbox/sandbox.py",
        "self.id, spec, self.workdir / CONTAINER_DIR, network=self.network, cgroup=self.cgroup",
        "self.id, spec, self.workdir / CONTAINER_DIR",
        ("tests/network/test_gvisor_egress_api.py::test_gvisor_egress_none_then_allow_then_the_live_cut",),
    ),
    Mutation(
        "gvisor.spare-resized",
        "a gVisor create that takes a pool's spare gets the request's limits, not the template's",
        "src/tartarus/sandbox/sandbox.py",
        "sized to these now\n            self._attach_cgroup(GVISOR)",
        "sized to these now\n            pass",
        (
            "tests/network/test_gvisor_egress_api.py::"
            "test_a_gvisor_create_restores_into_a_created_ahead_container_with_its_own_limits_and_egress",
        ),
    ),
    Mutation(
        "gvisor.nic-namespace",
        "a gVisor sandbox runs in its NIC's namespace, behind the sandbox namespace's egress rules",
        "src/tartarus/network/sandbox.py",
        "        return netns_path(self.netns + NIC_SUFFIX)",
        "        return netns_path(self.netns)",
        (f"{GVISOR_CONTAINMENT}test_default_deny_egress_drops_and_counts_every_attempt",),
    ),
    Mutation(
        "gvisor.cgroup-join",
        "a gVisor sandbox's host processes are born in its cgroup",
        "src/tartarus/gvisor/containment.py",
        'steps = [f"echo $$ > {shlex.quote(str(procs))}" for procs in cgroup_procs]',
        "steps: list[str] = []",
        (f"{GVISOR_CONTAINMENT}test_the_memory_limit_holds_and_the_host_is_unaffected",),
    ),
    Mutation(
        "memory.restore-without-kernel",
        "a VMM waiting for incoming state is given no kernel to hold in its heap",
        "src/tartarus/runtime/qemu.py",
        "    if config.incoming:\n        return []\n",
        "",
        ("tests/unit/test_artifacts.py::test_only_a_booting_vm_is_given_a_kernel_to_keep",),
    ),
    Mutation(
        "memory.tcg-without-thp",
        "a TCG VMM runs without transparent huge pages",
        "src/tartarus/runtime/qemu.py",
        'return config.accel != "tcg"',
        "return True",
        ("tests/unit/test_artifacts.py::test_only_tcg_goes_without_transparent_huge_pages",),
    ),
    Mutation(
        "gvisor.capture-leaves-running",
        "a gVisor hibernation that fails before its commit point leaves the same container running",
        "src/tartarus/sandbox/gvisor_capture.py",
        "await sandbox.container.checkpoint(staging / GVISOR_IMAGE, leave_running=True)",
        "await sandbox.container.checkpoint(staging / GVISOR_IMAGE, leave_running=False)",
        (
            "tests/gvisor/test_hibernation.py::test_a_hibernation_that_fails_before_its_commit_leaves_it_running",
        ),
    ),
    Mutation(
        "gvisor.wake-puts-back",
        "a gVisor wake that fails after its commit point puts the saved sandbox back",
        "src/tartarus/sandbox/gvisor_capture.py",
        "        if committed:  # the image is as it was captured",
        "        if False:  # the image is as it was captured",
        ("tests/gvisor/test_hibernation.py::test_a_wake_that_fails_leaves_it_hibernated",),
    ),
    Mutation(
        "gvisor.channel-keeper",
        "a served daemon's gVisor sandbox keeps its agent's channel open after the daemon dies",
        "src/tartarus/gvisor/container.py",
        "            if self.keep_channel:\n                self._keep(host)",
        "            if False:\n                self._keep(host)",
        ("tests/gvisor/test_takeover.py::test_kill_9_then_restart_takes_over_running_gvisor_sandboxes",),
    ),
)


@dataclass
class Outcome:
    name: str
    guard: str
    caught: bool
    status: int
    seconds: float
    failed: list[str]


def _pytest(scratch: Path, tests: tuple[str, ...], log: Path) -> tuple[int, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(scratch / "src")}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x", "-rf", *tests]
    with log.open("w") as out:
        status = subprocess.run(cmd, cwd=scratch, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    failed = [line for line in log.read_text().splitlines() if re.match(r"(FAILED|ERROR) \S+::", line)]
    return status, failed


def mutate(scratch: Path, mutation: Mutation) -> str:
    """Apply `mutation` in `scratch`; returns the original text to restore."""
    path = scratch / mutation.path
    original = path.read_text()
    count = original.count(mutation.find)
    if count != 1:
        raise SystemExit(f"{mutation.name}: the snippet occurs {count} times in {mutation.path}, not once")
    path.write_text(original.replace(mutation.find, mutation.replace))
    return original


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--json", type=Path, help="write the outcomes here")
    args = parser.parse_args(argv)

    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"no such mutation: {', '.join(sorted(unknown))}")
    if args.list:
        for m in chosen:
            print(f"{m.name:36} {m.guard}")
        return 0

    with tempfile.TemporaryDirectory(prefix="tartarus-mutation-") as tmp:
        scratch = Path(tmp) / "repo"
        shutil.copytree(REPO, scratch, ignore=COPY_IGNORE, symlinks=True)
        logs = Path(tmp) / "logs"
        logs.mkdir()
        for m in chosen:  # every snippet is present before anything runs: a stale list fails fast
            (scratch / m.path).write_text(mutate(scratch, m))

        baseline = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        print(f"baseline: {len(baseline)} test targets, unmutated", flush=True)
        status, failed = _pytest(scratch, baseline, logs / "baseline.log")
        if status != 0:
            print((logs / "baseline.log").read_text()[-4000:])
            print("the tests fail without any mutation: fix them first", file=sys.stderr)
            return 2

        outcomes = []
        for m in chosen:
            original = mutate(scratch, m)
            started = time.monotonic()
            try:
                status, failed = _pytest(scratch, m.tests, logs / f"{m.name}.log")
            finally:
                (scratch / m.path).write_text(original)
            # 1: tests failed. 2-5 (interrupted, internal error, usage, nothing collected) prove nothing.
            outcome = Outcome(m.name, m.guard, status == 1, status, time.monotonic() - started, failed)
            outcomes.append(outcome)
            mark = "caught  " if outcome.caught else "SURVIVED"
            print(f"{mark} {m.name:36} {outcome.seconds:6.1f} s  {(failed or [''])[0][:90]}", flush=True)
            if not outcome.caught:
                print((logs / f"{m.name}.log").read_text()[-3000:])

    if args.json:
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=2) + "\n")
    survived = [o.name for o in outcomes if not o.caught]
    print(f"{len(outcomes) - len(survived)}/{len(outcomes)} guards caught")
    if survived:
        print("survived: " + ", ".join(survived), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
