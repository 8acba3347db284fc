"""Host and Origin parsing of the cross-site checks (issue 21, item 6)."""

from __future__ import annotations

import pytest

from app.api.origins import host_name, same_origin


@pytest.mark.parametrize(
    ("host", "name"),
    [
        ("127.0.0.1:8000", "127.0.0.1"),
        ("[::1]:8000", "::1"),
        ("Example.COM", "example.com"),
        ("::1", "::1"),
        ("", ""),
    ],
)
def test_host_name_drops_the_port_and_case(host: str, name: str) -> None:
    assert host_name(host) == name


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1:8000", True),
        ("https://api.example.com", "api.example.com", True),  # behind a TLS proxy: scheme not compared
        ("http://127.0.0.1", "127.0.0.1:80", True),  # default port
        ("http://[::1]:8000", "[::1]:8000", True),
        ("http://127.0.0.1:8001", "127.0.0.1:8000", False),
        ("http://127.0.0.1.evil.example", "127.0.0.1", False),
        ("null", "127.0.0.1:8000", False),
        ("file://", "127.0.0.1:8000", False),
    ],
)
def test_same_origin_compares_host_and_port(origin: str, host: str, same: bool) -> None:
    assert same_origin(origin, host) is same
