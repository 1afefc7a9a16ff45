"""Errors of image conversion, one class per failure a user must tell apart.

Each derives from the general class whose REST code fits (so the SDK raises something meaningful on the
other side of the wire) and from `ImageError`, so callers can catch every image failure at once.
"""

from __future__ import annotations

from tartarus.errors import AuthError, InvalidArgument, NotFound, TartarusError


class ImageError(TartarusError):
    """Anything that stops an image from becoming a root filesystem."""

    code = "invalid_argument"
    status = 422


class InvalidReference(ImageError, InvalidArgument):
    code = InvalidArgument.code
    status = InvalidArgument.status


class ImageNotFound(ImageError, NotFound):
    """Unknown repository, tag, digest or platform."""

    code = NotFound.code
    status = NotFound.status


class RegistryAuthError(ImageError, AuthError):
    """The registry wants credentials we do not have, or refused the ones we sent."""

    code = AuthError.code
    status = AuthError.status


class RegistryError(ImageError):
    """The registry misbehaved: unreachable, 5xx after retries, or an unexpected answer."""

    code = "internal"
    status = 502


class DigestMismatch(ImageError):
    """Content does not hash to the digest that names it: corrupted or tampered with."""


class TruncatedBlob(ImageError):
    """A blob ended before its declared size."""


class UnsupportedMediaType(ImageError):
    """A manifest, index or layer type this converter does not handle (schema 1, bzip2...)."""


class UnsafeLayer(ImageError):
    """A layer entry that cannot be applied without touching something outside the image's root."""


class BuildFailed(ImageError):
    """mkfs failed on an applied tree (the message carries its output)."""

    code = "internal"
    status = 500
