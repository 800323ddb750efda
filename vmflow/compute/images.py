"""Image references: the gateway resolves images by tag, so digests are stripped first."""

from __future__ import annotations

import re

# name components as in the OCI distribution spec, with an optional registry host[:port]
_REFERENCE = re.compile(
    r"^(?P<name>(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?"
    r"(?:@(?P<digest>[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}))?$"
)


class InvalidImageReferenceError(ValueError):
    """The image reference is empty or does not follow `[registry/]name[:tag][@digest]`."""


def strip_image_digest(reference: str) -> str:
    """Return `reference` without its `@digest`, keeping registry port and tag.

    `registry:5000/team/repo:tag@sha256:…` becomes `registry:5000/team/repo:tag`;
    a reference without a digest comes back unchanged.
    """
    if not reference or not reference.strip():
        raise InvalidImageReferenceError(
            f"image reference {reference!r} is empty; expected [registry/]name[:tag][@digest]"
        )
    match = _REFERENCE.match(reference)
    if match is None:
        raise InvalidImageReferenceError(
            f"image reference {reference!r} is malformed; "
            "expected [registry/]name[:tag][@digest] such as team/app:1.2@sha256:<hex>"
        )
    if match.group("digest") is None:
        return reference
    name, tag = match.group("name"), match.group("tag")
    return f"{name}:{tag}" if tag else name
