"""Docker's reference normalisation: which spellings name the same image."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imageunlock.engine.refs import describe, normalize_ref, unrequested


@pytest.mark.parametrize(
    "ref, full",
    [
        ("nginx", "docker.io/library/nginx:latest"),
        ("nginx:latest", "docker.io/library/nginx:latest"),
        ("library/nginx:1.25", "docker.io/library/nginx:1.25"),
        ("docker.io/nginx:1.25", "docker.io/library/nginx:1.25"),
        ("index.docker.io/nginx", "docker.io/library/nginx:latest"),
        ("index.docker.io/library/nginx:1", "docker.io/library/nginx:1"),
        ("azaion/flights:2.0", "docker.io/azaion/flights:2.0"),
        ("docker.io/azaion/flights:2.0", "docker.io/azaion/flights:2.0"),
        ("index.docker.io/azaion/flights:2.0", "docker.io/azaion/flights:2.0"),
        ("a/b/c:1", "docker.io/a/b/c:1"),
        ("registry.example.com/azaion/flights:2.0", "registry.example.com/azaion/flights:2.0"),
        ("registry.example.com/flights", "registry.example.com/flights:latest"),  # no library/ off the Hub
        ("localhost/x", "localhost/x:latest"),
        ("localhost:5000/x:1", "localhost:5000/x:1"),
        ("myhost:5000/x", "myhost:5000/x:latest"),
        ("Registry/x:1", "Registry/x:1"),  # an upper-case first component is a host
        ("nginx@sha256:" + "a" * 64, "docker.io/library/nginx@sha256:" + "a" * 64),
        ("nginx:1@sha256:" + "a" * 64, "docker.io/library/nginx:1@sha256:" + "a" * 64),
    ],
)
def test_normalize_ref(ref: str, full: str):
    assert normalize_ref(ref) == full


@pytest.mark.parametrize(
    "a, b",
    [
        ("nginx:latest", "docker.io/library/nginx"),
        ("azaion/x:1", "index.docker.io/azaion/x:1"),
        ("library/busybox", "busybox:latest"),
    ],
)
def test_spellings_of_one_image_are_equal(a: str, b: str):
    assert normalize_ref(a) == normalize_ref(b)


@pytest.mark.parametrize(
    "a, b",
    [
        ("azaion/x:1", "azaion/x:2"),
        ("azaion/x:1", "other/x:1"),
        ("azaion/x:1", "registry.example.com/azaion/x:1"),
        ("nginx", "localhost/nginx"),
        ("nginx:latest", "nginx@sha256:" + "a" * 64),
    ],
)
def test_different_images_stay_different(a: str, b: str):
    assert normalize_ref(a) != normalize_ref(b)


_COMPONENT = st.from_regex(r"[a-z0-9]{1,6}(?:[._-][a-z0-9]{1,6})?", fullmatch=True)
_REF = st.builds(
    lambda host, path, tag: host + "/".join(path) + tag,
    st.sampled_from(["", "docker.io/", "index.docker.io/", "localhost/", "r.example:5000/", "Up/"]),
    st.lists(_COMPONENT, min_size=1, max_size=3),
    st.sampled_from(["", ":1", ":latest", "@sha256:" + "b" * 64]),
)


@given(_REF)
def test_normalization_is_idempotent_and_fully_qualified(ref: str):
    full = normalize_ref(ref)
    assert normalize_ref(full) == full
    host, _, rest = full.partition("/")
    assert "." in host or ":" in host or host in ("localhost", "Up")
    assert "/" in rest or host != "docker.io"


def test_unrequested_keeps_each_foreign_tag_once_in_order():
    tags = ["azaion/x:1", "nginx:latest", "docker.io/azaion/x:1", "docker.io/library/nginx", "nginx:latest"]
    assert unrequested(tags, ["index.docker.io/azaion/x:1"]) == ["nginx:latest", "docker.io/library/nginx"]
    assert unrequested(tags[:1], ["azaion/x:1"]) == []


def test_describe_is_short_and_printable():
    refs = [f"team{i}/app:1" for i in range(7)]
    assert describe(refs) == "team0/app:1, team1/app:1, team2/app:1, team3/app:1, team4/app:1 and 2 more"
    assert describe(["a\n\x1b[2Jb:1"]) == "a??[2Jb:1"
    assert describe(["x" * 1000]) == "x" * 128 + "..."


def test_image_names_are_owned_by_prefix_or_exact_repository_as_docker_normalises_them():
    from imageunlock.engine.refs import owned

    assert owned("azaion/flights", ["azaion/"]) and owned("docker.io/azaion/flights", ["azaion/"])
    assert owned("index.docker.io/azaion/flights", ["docker.io/azaion/"])
    assert not owned("azaion-evil/flights", ["azaion/"]) and not owned("azaionx/flights", ["azaion/"])
    assert owned("registry.corp/team-a/api", ["registry.corp/team-a/"])
    assert not owned("registry.corp/team-b/api", ["registry.corp/team-a/"])
    assert owned("nginx", ["library/nginx"]) and owned("nginx", ["nginx"]) and not owned("nginx-x", ["nginx"])
    assert not owned("azaion/flights", [])
