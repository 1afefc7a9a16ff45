"""Exceptions shared by the runtime, the API and the SDK.

Each has a stable `code` that the REST API puts in its error bodies, so the SDK can raise the same class
on the other side of the wire.
"""

from __future__ import annotations


class TartarusError(Exception):
    code = "internal"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(TartarusError):
    code = "not_found"
    status = 404


class InvalidArgument(TartarusError):
    code = "invalid_argument"
    status = 400


class Timeout(TartarusError):
    code = "timeout"
    status = 504


class Conflict(TartarusError):
    code = "conflict"
    status = 409


class QuotaExceeded(TartarusError):
    code = "quota_exceeded"
    status = 429


class InsufficientStorage(TartarusError):
    """The host's disk is too full for the operation; nothing was lost (the sandbox keeps running)."""

    code = "insufficient_storage"
    status = 507


class AuthError(TartarusError):
    code = "unauthorized"
    status = 401


class PayloadTooLarge(TartarusError):
    """The request body is larger than the route accepts; the daemon stopped reading it."""

    code = "payload_too_large"
    status = 413


class PolicyDenied(TartarusError):
    """The admission policy refused the request; the message says which rule and why."""

    code = "policy_denied"
    status = 403


class PermissionDenied(TartarusError):
    """The key is valid but its role may not do this (tenant keys on admin endpoints)."""

    code = "forbidden"
    status = 403


class Quarantined(TartarusError):
    """The sandbox is quarantined: the operation is refused until an admin releases it."""

    code = "quarantined"
    status = 423


class SandboxFailed(TartarusError):
    """The sandbox's VM or guest agent died; the message says why (panic, agent exit, QEMU exit)."""

    code = "sandbox_failed"
    status = 502


class CaptureFailed(TartarusError):
    """Hibernating or checkpointing failed and was undone: the sandbox keeps running as it was. The cause
    (often the VMM's stream, which says nothing a caller can act on) is in the daemon's log."""

    code = "capture_failed"
    status = 500


class GuestError(TartarusError):
    """An operation inside the guest failed with an errno (file not found, permission denied...)."""

    code = "guest_error"
    status = 422

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class SetupRequired(TartarusError):
    """A kernel, agent or template artefact is missing: run `tartarus setup`."""

    code = "setup_required"
    status = 503


class BackendUnavailable(TartarusError):
    """The backend asked for (kvm, tcg, gvisor) does not work on this host; the message says why."""

    code = "backend_unavailable"
    status = 503


class RegistryUnavailable(TartarusError):
    """An image registry could not be used: unreachable, refusing access, or answering nonsense."""

    code = "registry_error"
    status = 502


class InvalidImage(TartarusError):
    """The image cannot become a root filesystem: corrupt or truncated blobs, unsupported media types,
    unsafe layer entries, or a filesystem its contents cannot be packed into."""

    code = "invalid_image"
    status = 422


class NotReady(TartarusError):
    """A readiness check failed (`/v1/health?ready=true`): this daemon cannot serve creates now."""

    code = "not_ready"
    status = 503

    def __init__(self, message: str, checks: list[dict[str, object]] | None = None) -> None:
        super().__init__(message)
        self.checks = checks or []


ALL: dict[str, type[TartarusError]] = {
    cls.code: cls
    for cls in (
        TartarusError,
        NotFound,
        InvalidArgument,
        Timeout,
        Conflict,
        QuotaExceeded,
        InsufficientStorage,
        AuthError,
        PayloadTooLarge,
        PolicyDenied,
        PermissionDenied,
        Quarantined,
        SandboxFailed,
        CaptureFailed,
        GuestError,
        SetupRequired,
        BackendUnavailable,
        RegistryUnavailable,
        InvalidImage,
        NotReady,
    )
}
