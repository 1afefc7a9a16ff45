"""Errors the cluster modules raise; each carries a stable code the gateway can put in an API error."""

from __future__ import annotations

from tartarus.errors import Conflict, InvalidArgument, NotFound, TartarusError


class ClusterUnavailable(TartarusError):
    """The coordination database or the object store cannot be reached."""

    code = "cluster_unavailable"
    status = 503


class Fenced(Conflict):
    """A node's lease lapsed (or a newer epoch replaced it): it must stop taking work and re-register."""

    code = "fenced"


class NoCapacity(TartarusError):
    """No healthy, schedulable node with the required labels has room for the sandbox."""

    code = "no_capacity"
    status = 503


class ReservationLost(Conflict):
    """The reservation expired, was reclaimed, or its node was fenced before it was confirmed."""

    code = "reservation_lost"


class NodeRefused(TartarusError):
    """Raised by a placement callback when the chosen agent refused or failed: try another node."""

    code = "node_refused"
    status = 503


class UnknownNode(NotFound):
    code = "unknown_node"


class ManifestInvalid(InvalidArgument):
    """A capture manifest that does not parse or does not add up; nothing is downloaded from it."""

    code = "manifest_invalid"


class ObjectMissing(NotFound):
    """An object the manifest names is not in the store."""

    code = "object_missing"


class ChunkCorrupt(TartarusError):
    """A downloaded chunk does not decompress or its SHA-256 does not match its key."""

    code = "chunk_corrupt"
    status = 502
