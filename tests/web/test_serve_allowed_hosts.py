"""`skinclf serve --allowed-hosts` / SKINCLF_ALLOWED_HOSTS: the Host guard on every address, 0.0.0.0 included.

In a container the server listens on 0.0.0.0 so that a published loopback port reaches it; the
Host check (against DNS rebinding) and the Origin check built on it must still hold there: only
the localhost names by default, plus the names given. A numpy engine stands in for a model.
"""

from __future__ import annotations

import pytest
from test_serve_guards import FakeEngine, files, image

pytest.importorskip("fastapi", reason="skinclf[serve] (FastAPI) is not installed")
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import skinclf.engines.load
from skinclf.cli import app as cli_app
from skinclf.errors import SkinclfError
from skinclf.web import server as serve_module
from skinclf.web.routes import create_app
from skinclf.web.guards import LOCAL_HOST_NAMES, allowed_host_names, host_of


# --- the names -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("bind", "extra", "expected"), [
    ("127.0.0.1", "", sorted(LOCAL_HOST_NAMES)),
    ("0.0.0.0", "", sorted(LOCAL_HOST_NAMES)),  # a wildcard names no host: localhost names only
    ("::", (), sorted(LOCAL_HOST_NAMES)),
    ("192.168.1.5", "", sorted([*LOCAL_HOST_NAMES, "192.168.1.5"])),  # the address bound is answered
    ("0.0.0.0", " Skinclf.LAN ,10.0.0.5,,[fe80::1]", sorted([*LOCAL_HOST_NAMES, "skinclf.lan", "10.0.0.5", "fe80::1"])),
    ("0.0.0.0", ["clinic-pc.local."], sorted([*LOCAL_HOST_NAMES, "clinic-pc.local"])),
    ("0.0.0.0", "skinclf.lan,*", None),  # any host: the check is off, on purpose
])
def test_allowed_host_names(bind: str, extra, expected) -> None:
    assert allowed_host_names(bind, extra) == expected


@pytest.mark.parametrize("bad", ["http://skinclf.lan", "skinclf.lan:8000", "skinclf.lan/", "a b", "*.lan", "-x.lan"])
def test_allowed_host_names_refuses_what_is_not_a_host_name(bad: str) -> None:
    with pytest.raises(SkinclfError, match="^--allowed-hosts: .* is not a host name or address"):
        allowed_host_names("0.0.0.0", bad)


@pytest.mark.parametrize(("header", "host"), [
    ("localhost:8000", "localhost"), ("[::1]:8000", "::1"), ("Skinclf.LAN.:80", "skinclf.lan"), ("", ""),
])
def test_host_of(header: str, host: str) -> None:
    assert host_of(header) == host


# --- the API under those names -------------------------------------------------------------------

def test_api_answers_only_the_allowed_names_and_the_origin_check_follows_the_host() -> None:
    app = create_app(FakeEngine(), allowed_hosts=allowed_host_names("0.0.0.0", "skinclf.lan"))
    client = TestClient(app, base_url="http://skinclf.lan:8000")
    for host in ("skinclf.lan:8000", "SKINCLF.LAN", "127.0.0.1:8000", "localhost", "[::1]:8000"):
        assert client.get("/healthz", headers={"host": host}).status_code == 200, host
    refused = client.get("/healthz", headers={"host": "evil.example:8000"})
    assert refused.status_code == 400 and "--allowed-hosts" in refused.json()["detail"]
    # A page under an allowed name may post to that name; another site's page may not.
    own = client.post("/api/predict", headers={"Origin": "http://skinclf.lan:8000", "Sec-Fetch-Site": "same-origin"},
                      files=files(("a.png", image((40, 30)))))
    assert own.status_code == 200 and app.state.classifier.calls == 1
    other = client.post("/api/predict", headers={"Origin": "http://evil.example"},
                        files=files(("a.png", image((40, 30)))))
    assert other.status_code == 403 and app.state.classifier.calls == 1
    # A rebound name reaching the server is refused before the Origin check could call it "own".
    rebound = client.post("/api/predict", headers={"Host": "evil.example:8000", "Origin": "http://evil.example:8000"},
                          files=files(("a.png", image((40, 30)))))
    assert rebound.status_code == 400 and app.state.classifier.calls == 1


# --- the command ---------------------------------------------------------------------------------

@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Run `skinclf serve` with a fake model; instead of serving, answer /healthz under a few Host names."""
    monkeypatch.setattr(skinclf.engines.load, "load_engine", lambda path, **kwargs: FakeEngine())
    seen: dict = {}

    def fake_run(app, sock) -> None:
        seen["bound"] = sock.getsockname()
        client = TestClient(app)
        seen["status"] = {host: client.get("/healthz", headers={"host": f"{host}:8000"}).status_code
                          for host in ("127.0.0.1", "localhost", "skinclf.lan", "evil.example")}

    monkeypatch.setattr(serve_module, "_run_server", fake_run)
    monkeypatch.delenv("SKINCLF_ALLOWED_HOSTS", raising=False)
    return seen


def test_cli_serve_on_0000_answers_only_localhost_names_by_default(served: dict) -> None:
    result = CliRunner().invoke(cli_app, ["serve", "--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code == 0, result.output
    assert served["bound"][0] == "0.0.0.0"
    assert served["status"] == {"127.0.0.1": 200, "localhost": 200, "skinclf.lan": 400, "evil.example": 400}
    assert "Warning: listening on 0.0.0.0" in result.output
    assert "Requests are answered under: 127.0.0.1, ::1, localhost." in result.output


@pytest.mark.parametrize("how", ["option", "env"])
def test_cli_serve_allowed_hosts_from_the_option_or_the_environment(served: dict, how: str) -> None:
    args = ["serve", "--host", "0.0.0.0", "--port", "0"]
    if how == "option":
        result = CliRunner().invoke(cli_app, [*args, "--allowed-hosts", "skinclf.lan"])
    else:
        result = CliRunner().invoke(cli_app, args, env={"SKINCLF_ALLOWED_HOSTS": "skinclf.lan"})
    assert result.exit_code == 0, result.output
    assert served["status"] == {"127.0.0.1": 200, "localhost": 200, "skinclf.lan": 200, "evil.example": 400}
    assert "answered under: 127.0.0.1, ::1, localhost, skinclf.lan." in result.output


def test_cli_serve_allowed_hosts_star_turns_the_check_off_and_says_so(served: dict) -> None:
    result = CliRunner().invoke(cli_app, ["serve", "--port", "0", "--allowed-hosts", "*"])
    assert result.exit_code == 0, result.output
    assert served["status"]["evil.example"] == 200
    # even on loopback:
    assert "Warning: --allowed-hosts '*': requests are answered under any host name" in result.output
    on_all = CliRunner().invoke(cli_app, ["serve", "--host", "0.0.0.0", "--port", "0"],
                                env={"SKINCLF_ALLOWED_HOSTS": "*"})
    assert on_all.exit_code == 0 and "answered under: any host name (--allowed-hosts '*')" in on_all.output


def test_cli_serve_on_loopback_with_allowed_hosts_stays_quiet(served: dict) -> None:
    result = CliRunner().invoke(cli_app, ["serve", "--port", "0", "--allowed-hosts", "skinclf.lan"])
    assert result.exit_code == 0, result.output
    assert served["status"]["skinclf.lan"] == 200 and "Warning" not in result.output


@pytest.mark.parametrize(("how", "value"), [("option", "http://skinclf.lan"), ("env", "skinclf.lan:8000")])
def test_cli_serve_bad_allowed_hosts_is_one_line_before_anything_loads(served: dict, how: str, value: str) -> None:
    if how == "option":
        result = CliRunner().invoke(cli_app, ["serve", "--port", "0", "--allowed-hosts", value])
    else:
        result = CliRunner().invoke(cli_app, ["serve", "--port", "0"], env={"SKINCLF_ALLOWED_HOSTS": value})
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: --allowed-hosts: '{value}' is not a host name or address")
    assert len(result.output.strip().splitlines()) == 1 and "bound" not in served
