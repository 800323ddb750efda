"""Digest stripping: the gateway resolves images by tag, so `@digest` goes, tag and port stay."""

from __future__ import annotations

import pytest

from vmflow.compute import InvalidImageReferenceError, strip_image_digest

DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        (f"repo@{DIGEST}", "repo"),
        (f"repo:tag@{DIGEST}", "repo:tag"),
        (f"registry:5000/team/repo:tag@{DIGEST}", "registry:5000/team/repo:tag"),
        (f"registry:5000/team/repo@{DIGEST}", "registry:5000/team/repo"),
        (f"ghcr.io/org/sub/app:1.2.3-rc.1@{DIGEST}", "ghcr.io/org/sub/app:1.2.3-rc.1"),
        (
            f"localhost:5000/app:v1@{DIGEST.upper().replace('SHA256', 'sha256')}",
            "localhost:5000/app:v1",
        ),
        (f"my_team/app__x.y-z:latest@sha512:{'ab' * 64}", "my_team/app__x.y-z:latest"),
    ],
)
def test_digest_is_stripped_keeping_tag_and_port(reference: str, expected: str) -> None:
    assert strip_image_digest(reference) == expected


@pytest.mark.parametrize(
    "reference",
    [
        "repo",
        "repo:tag",
        "team/repo:1.0",
        "registry:5000/team/repo",
        "registry:5000/team/repo:tag",
        "docker.io/library/python:3.11-slim",
    ],
)
def test_reference_without_digest_is_unchanged(reference: str) -> None:
    assert strip_image_digest(reference) == reference


@pytest.mark.parametrize("reference", ["", "   ", "\t"])
def test_empty_reference_is_rejected(reference: str) -> None:
    with pytest.raises(InvalidImageReferenceError, match="empty") as caught:
        strip_image_digest(reference)
    assert repr(reference) in str(caught.value)


@pytest.mark.parametrize(
    "reference",
    [
        "Repo:tag",  # upper case in the name
        "repo:tag@sha256:xyz",  # digest that is not hex
        "repo@sha256:abc",  # digest too short
        "repo:@sha256:" + "a" * 64,  # empty tag
        "repo:ta g",  # space in the tag
        "repo@",  # digest separator alone
        "/repo",  # empty path component
        "repo//x",
        "registry:port/repo",  # port that is not a number
        " repo:tag",  # surrounding whitespace
        "repo:" + "t" * 129,  # tag longer than 128 characters
    ],
)
def test_malformed_reference_is_rejected_showing_the_value(reference: str) -> None:
    with pytest.raises(InvalidImageReferenceError, match="malformed") as caught:
        strip_image_digest(reference)
    assert repr(reference) in str(caught.value)


def test_invalid_reference_error_is_a_value_error() -> None:
    assert issubclass(InvalidImageReferenceError, ValueError)
