"""Image references, digests, platforms and registry credentials: parsing only, no network."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tartarus.images.auth import find_credentials, parse_challenge
from tartarus.images.errors import InvalidReference
from tartarus.images.manifest import Platform
from tartarus.images.reference import parse_digest, parse_reference
from tartarus.images.registry import RegistryClient

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("python", "docker.io", "library/python", "latest", None),
        ("python:3.11-slim", "docker.io", "library/python", "3.11-slim", None),
        ("user/app:v1", "docker.io", "user/app", "v1", None),
        ("127.0.0.1:5000/python:3.11-slim", "127.0.0.1:5000", "python", "3.11-slim", None),
        ("localhost/a/b/c", "localhost", "a/b/c", "latest", None),
        ("ghcr.io/org/img@" + DIGEST, "ghcr.io", "org/img", None, DIGEST),
        ("reg.example.com:443/x:y@" + DIGEST, "reg.example.com:443", "x", "y", DIGEST),
        ("[::1]:5000/img:1", "[::1]:5000", "img", "1", None),
    ],
)
def test_parse_reference(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "UPPER/case",
        "a//b",
        "img:bad tag",
        "img@sha256:xyz",
        "img@md5:" + "0" * 32,
        " img",
        "img:",
        "-img",
    ],
)
def test_invalid_references_are_clear_errors(text: str) -> None:
    with pytest.raises(InvalidReference):
        parse_reference(text)


def test_digests_are_validated_because_they_become_file_names() -> None:
    assert parse_digest(DIGEST) == DIGEST
    for bad in [
        "sha256:../../etc/passwd",
        "sha256:" + "AB" * 32,
        "sha256:" + "a" * 63,
        "sha256",
        DIGEST + "/x",
    ]:
        with pytest.raises(InvalidReference):
            parse_digest(bad)


def test_plain_http_only_for_loopback_or_insecure() -> None:
    assert RegistryClient(parse_reference("127.0.0.1:5000/x")).base.startswith("http://127.0.0.1:5000/v2/x")
    assert RegistryClient(parse_reference("localhost:5000/x")).base.startswith("http://")
    assert RegistryClient(parse_reference("reg.example.com/x")).base.startswith("https://")
    assert RegistryClient(parse_reference("reg.example.com/x"), insecure=True).base.startswith("http://")
    assert RegistryClient(parse_reference("python")).base == "https://registry-1.docker.io/v2/library/python"


def test_platforms() -> None:
    want = Platform.from_string("linux/arm64")
    assert want.matches(Platform("linux", "arm64", "v8"))
    assert not Platform.from_string("linux/arm64/v7").matches(Platform("linux", "arm64", "v8"))
    assert not want.matches(Platform("linux", "amd64"))


def test_challenge_parsing() -> None:
    c = parse_challenge(
        'Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push"'
    )
    assert c is not None and c.scheme == "bearer"
    assert c.params == {
        "realm": "https://auth.example/token",
        "service": "reg",
        "scope": "repository:a/b:pull,push",
    }
    basic = parse_challenge('Basic realm="registry"')
    assert basic is not None and basic.scheme == "basic"


def test_credentials_from_docker_config_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    assert find_credentials("127.0.0.1:5000") is None
    docker = tmp_path / ".docker"
    docker.mkdir()
    auth = base64.b64encode(b"alice:pw:with:colons").decode()
    (docker / "config.json").write_text(
        json.dumps(
            {
                "auths": {
                    "http://127.0.0.1:5000": {"auth": auth},
                    "https://index.docker.io/v1/": {"username": "hub", "password": "hubpw"},
                }
            }
        )
    )
    creds = find_credentials("127.0.0.1:5000")
    assert creds is not None and (creds.username, creds.password) == ("alice", "pw:with:colons")
    assert "pw:with" not in repr(creds)
    hub = find_credentials("docker.io")
    assert hub is not None and hub.username == "hub"
    assert find_credentials("127.0.0.1:5001") is None
    # REGISTRY_AUTH_FILE wins over ~/.docker/config.json.
    other = tmp_path / "auth.json"
    other.write_text(json.dumps({"auths": {"127.0.0.1:5000": {"username": "bob", "password": "b"}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(other))
    creds = find_credentials("127.0.0.1:5000")
    assert creds is not None and creds.username == "bob"
