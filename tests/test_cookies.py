"""The session's cookie jar, per RFC 6265: expiry, Domain and Path, replacement, deletion, and
which cookies a request URL gets."""

from __future__ import annotations

from sidecar.cookies import (
    Cookie,
    cookie_header,
    merge_cookie_headers,
    parse_cookie_date,
    parse_set_cookie,
    store_cookies,
)

NOW = 1_800_000_000.0


def jar_of(
    *headers: str, host: str = "auth.example.com", path: str = "/api/login"
) -> tuple[Cookie, ...]:
    return store_cookies((), headers, host, path, NOW)


def test_expiry_from_max_age_wins_over_expires() -> None:
    """Max-Age counts from the injected now and takes precedence over Expires (RFC 6265 5.3.3);
    without either the cookie lives as long as the session."""
    c = parse_set_cookie(
        "a=1; Max-Age=60; Expires=Wed, 21 Oct 2015 07:28:00 GMT", "h.example", "/", NOW
    )
    assert c is not None
    assert c.expires_at == NOW + 60
    c = parse_set_cookie("a=1; Expires=Sun, 15 Jan 2027 08:00:00 GMT", "h.example", "/", NOW)
    assert c is not None
    assert c.expires_at == parse_cookie_date("Sun, 15 Jan 2027 08:00:00 GMT")
    c = parse_set_cookie("a=1", "h.example", "/", NOW)
    assert c is not None
    assert c.expires_at is None


def test_cookie_dates_are_parsed_leniently() -> None:
    """The RFC 6265 5.1.1 algorithm: any order of tokens, two-digit years, junk refused."""
    assert parse_cookie_date("Wed, 21 Oct 2015 07:28:00 GMT") == 1445412480.0
    assert parse_cookie_date("21-Oct-15 07:28:00") == 1445412480.0
    assert parse_cookie_date("not a date") is None
    assert parse_cookie_date("Wed, 32 Oct 2015 07:28:00 GMT") is None


def test_expired_cookies_are_not_sent_and_are_dropped() -> None:
    """A cookie past its Max-Age is neither sent nor kept by the next update."""
    jar = jar_of("short=1; Max-Age=10", "long=2; Max-Age=1000")
    assert cookie_header(jar, "https", "auth.example.com", "/api", NOW + 5) == "short=1; long=2"
    assert cookie_header(jar, "https", "auth.example.com", "/api", NOW + 10) == "long=2"
    later = store_cookies(jar, [], "auth.example.com", "/api", NOW + 11)
    assert [c.name for c in later] == ["long"]


def test_max_age_zero_deletes_and_same_key_replaces() -> None:
    """Max-Age=0 deletes the cookie with the same name, domain and path; a new value for the same
    key replaces the old one in place; another path is another cookie."""
    jar = jar_of("sid=old; Path=/", "other=x; Path=/", "sid=deep; Path=/api")
    jar = store_cookies(jar, ["sid=new; Path=/"], "auth.example.com", "/", NOW)
    assert [(c.name, c.value, c.path) for c in jar] == [
        ("sid", "new", "/"),
        ("other", "x", "/"),
        ("sid", "deep", "/api"),
    ]
    jar = store_cookies(jar, ["sid=; Max-Age=0; Path=/"], "auth.example.com", "/", NOW)
    assert [(c.name, c.path) for c in jar] == [("other", "/"), ("sid", "/api")]
    jar = store_cookies(
        jar, ["other=; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Path=/"], "auth.example.com", "/", NOW
    )
    assert [(c.name, c.path) for c in jar] == [("sid", "/api")]


def test_domain_attribute_rules() -> None:
    """Without Domain the cookie is host-only; Domain=example.com reaches subdomains; a Domain the
    host does not belong to, or a bare top-level label, is ignored (RFC 6265 5.3 step 6)."""
    jar = jar_of(
        "host=1",
        "wide=2; Domain=.Example.COM",
        "foreign=3; Domain=evil.com",
        "tld=4; Domain=com",
        path="/",
    )
    assert [c.name for c in jar] == ["host", "wide"]
    assert cookie_header(jar, "https", "auth.example.com", "/", NOW) == "host=1; wide=2"
    assert cookie_header(jar, "https", "api.example.com", "/", NOW) == "wide=2"
    assert cookie_header(jar, "https", "example.com", "/", NOW) == "wide=2"
    assert cookie_header(jar, "https", "notexample.com", "/", NOW) is None
    assert cookie_header(jar, "https", "evil.com", "/", NOW) is None


def test_ip_hosts_only_match_exactly() -> None:
    """An IP address host never domain-matches a suffix."""
    jar = store_cookies((), ["a=1"], "127.0.0.1", "/", NOW)
    assert cookie_header(jar, "http", "127.0.0.1", "/", NOW) == "a=1"
    assert cookie_header(jar, "http", "localhost", "/", NOW) is None


def test_path_default_and_matching() -> None:
    """The default path is the directory of the request (/api/v2/login → /api/v2); /api/v2
    matches /api/v2 and /api/v2/x but not /api/v2x; longer paths are sent first."""
    jar = jar_of("d=1", "root=2; Path=/", host="h.example", path="/api/v2/login")
    assert {c.name: c.path for c in jar} == {"d": "/api/v2", "root": "/"}
    assert cookie_header(jar, "https", "h.example", "/api/v2", NOW) == "d=1; root=2"
    assert cookie_header(jar, "https", "h.example", "/api/v2/accounts", NOW) == "d=1; root=2"
    assert cookie_header(jar, "https", "h.example", "/api/v2x", NOW) == "root=2"
    assert cookie_header(jar, "https", "h.example", "/other", NOW) == "root=2"


def test_secure_cookies_only_over_https() -> None:
    """A Secure cookie is sent to https URLs only."""
    jar = jar_of("s=1; Secure", "p=2", host="h.example", path="/")
    assert cookie_header(jar, "https", "h.example", "/", NOW) == "s=1; p=2"
    assert cookie_header(jar, "http", "h.example", "/", NOW) == "p=2"


def test_malformed_set_cookie_headers_are_ignored() -> None:
    """No name, no '=', a control character or an oversized header: ignored, not stored."""
    bad = ["=v", "novalue", "a=b\x01c", "big=" + "x" * 5000, " ; Path=/"]
    assert store_cookies((), bad, "h.example", "/", NOW) == ()


def test_cookie_round_trips_through_plain_data_and_hides_its_value() -> None:
    """What the store writes reads back equal; repr never shows the value."""
    cookie = Cookie("sid", "secret-cookie-value", "h.example", "/", False, True, NOW + 5)
    assert Cookie.from_dict(cookie.to_dict()) == cookie
    assert "secret-cookie-value" not in repr(cookie)


def test_merge_with_the_callers_cookie_header() -> None:
    """The caller's cookies are kept, the session's cookie wins on a name clash."""
    assert merge_cookie_headers("a=1; sid=callers", "sid=ours; b=2") == "a=1; sid=ours; b=2"
    assert merge_cookie_headers(None, "sid=ours") == "sid=ours"
    assert merge_cookie_headers("a=1", None) == "a=1"
    assert merge_cookie_headers(None, None) is None


async def test_upstream_cookie_header_follows_expiry_and_new_snapshots() -> None:
    """SessionCookies remembers the header per path, yet a cookie stops being sent the moment it
    expires on the injected clock, and a new credentials snapshot brings its own jar."""
    from sidecar.proxy.header_values import SessionCookies
    from sidecar.tokens import Credentials, Token
    from tests.fakes.clock import FakeClock

    clock = FakeClock(NOW)
    jar = store_cookies((), ["a=1; Max-Age=100", "b=2"], "api.example.com", "/", NOW)
    creds = Credentials(Token("t", NOW + 500, NOW, cookies=jar), "Bearer t", "s", "a", NOW + 500)
    cookies = SessionCookies("https://api.example.com/base", clock)
    assert cookies.header(None, creds, "/base/x") == "a=1; b=2"
    assert cookies.header("c=3", creds, "/base/x") == "c=3; a=1; b=2"
    await clock.advance(100)
    assert cookies.header(None, creds, "/base/x") == "b=2"
    other = Credentials(Token("u", NOW + 500, NOW), "Bearer u", "s", "a", NOW + 500)
    assert cookies.header("c=3", other, "/base/x") == "c=3"
    assert cookies.header(None, other, "/base/x") is None
