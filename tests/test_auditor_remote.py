"""``sshaudit sessions|download|auth-events`` against a real ``sshaudit-collector serve``
(uvicorn, TLS with its self-signed certificate, pinned), holding sessions and events that
an enrolled host uploaded over HTTP as the agent does.

What must hold: listings are filtered, newest first, paged with the cursor, and safe to
print (a host's escape sequences are shown, not obeyed); a download is byte-identical,
resumes from ``FILE.part``, and never leaves a wrong file at ``FILE``; every refusal is one
``sshaudit:`` line naming the collector's error code, and the token appears in no output.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from collector_helpers import (
    Host,
    Server,
    auth_event,
    cast_pieces,
    cli_ok,
    make_sealed,
    new_session_id,
    record,
    split_sealed,
    start_server,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sshaudit.auditor import remote_cli
from sshaudit.auditor.cli import main
from sshaudit.auditor.remote import Collector, Settings, iso_time, load_settings
from sshaudit.auditor.remote_download import _expected
from sshaudit.errors import SSHAuditError, UsageError

pytestmark = pytest.mark.slow
ESCAPE = "\x1b]52;c;cHduZWQ=\x07rm -rf /tmp/x"  # OSC 52: a clipboard write


@dataclass
class World:
    server: Server
    tmp: Path
    host: Host
    other: Host
    token: str
    token_file: Path
    sealed: dict[str, bytes]  # session id -> the file as uploaded
    order: list[str]  # the host's session ids, newest first

    @property
    def pin(self) -> str:
        assert self.server.fingerprint is not None
        return self.server.fingerprint

    def conn(self, token_file: Path | None = None, pin: str | None = None) -> list[str]:
        return [
            "--collector",
            self.server.url,
            "--token-file",
            str(token_file or self.token_file),
            "--fingerprint",
            pin or self.pin,
        ]

    def new_token(self, role: str) -> str:
        return cli_ok("token", "create", "--data", str(self.server.data), "--role", role).split()[
            -1
        ]

    def token_path(self, token: str, name: str) -> Path:
        path = self.tmp / name
        path.write_text(token + "\n")
        path.chmod(0o600)
        return path


def _enroll(server: Server, token: str, hostname: str) -> Host:
    key = Ed25519PrivateKey.generate()
    pub = base64.b64encode(key.public_key().public_bytes_raw()).decode()
    with server.client(token) as c:
        resp = c.post(
            server.url + "/v1/enroll", json={"hostname": hostname, "host_public_key": pub}
        )
    assert resp.status_code == 200, resp.text
    return Host(resp.json()["host_id"], resp.json()["credential"], key, hostname)


def _upload(server: Server, host: Host, doc: dict[str, Any], close: bool = True) -> bytes:
    sid = doc["session_id"]
    f = make_sealed(host, sid, cast_pieces(40), close=close)
    url = f"{server.url}/v1/sessions/{sid}"
    with server.client(host.credential) as c:
        assert c.put(url + "/recording", data=f.prefix).ok
        assert c.post(url + "/recording", params={"offset": len(f.prefix)}, data=f.body).ok
        assert c.put(url, json=doc).ok, c.put(url, json=doc).text
    return f.data


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("auditor-remote")
    data = tmp / "data"
    cli_ok("init", "--data", str(data))
    server = start_server(data)
    try:
        yield _populate(server, tmp)
    finally:
        server.stop()


def _populate(server: Server, tmp: Path) -> World:
    def token(role: str) -> str:
        return cli_ok("token", "create", "--data", str(server.data), "--role", role).split()[-1]

    host = _enroll(server, token("agent"), "web-1")
    other = _enroll(server, token("agent"), "db-1")
    sealed: dict[str, bytes] = {}
    order: list[str] = []
    for i in range(5):  # session_start 09:00, 09:01, ...: the newest is the last
        sid = new_session_id()
        program = "exec" if i % 2 else "shell"
        doc = record(
            sid,
            session_start=f"2026-11-22T09:0{i}:00Z",
            session_finish=f"2026-11-22T09:0{i}:30Z",
            unix_user="root" if i == 3 else "jdoe",
            program_type=program,
            command=(ESCAPE if i == 1 else f"echo {i}") if program == "exec" else None,
            exit_status=i,
            recording_status="complete",
        )
        sealed[sid] = _upload(server, host, doc)
        order.insert(0, sid)
    open_sid = new_session_id()
    doc = record(open_sid, session_start="2026-11-22T08:00:00Z", recording_status="recording")
    sealed[open_sid] = _upload(server, host, doc, close=False)
    order.append(open_sid)
    foreign = record(new_session_id(), session_start="2026-11-22T10:00:00Z")
    foreign["recording_status"] = "complete"
    _upload(server, other, foreign)
    events = [
        auth_event(f"ev-{i}", allowed=i != 1, reason="" if i != 1 else "expired") for i in range(3)
    ]
    with server.client(host.credential) as c:
        assert c.post(server.url + "/v1/auth-events", json={"events": events}).ok
    auditor = token("auditor")
    token_file = tmp / "auditor.token"
    token_file.write_text(auditor + "\n")
    token_file.chmod(0o600)
    return World(server, tmp, host, other, auditor, token_file, sealed, order)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


# --- listings


def test_sessions_list_json_is_filtered_and_newest_first(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(
        capsys, "sessions", "list", "--json", "--target", world.host.host_id, *world.conn()
    )
    assert status == 0, err
    items = json_lines(out)
    assert [d["session_id"] for d in items] == world.order
    assert {d["hostname"] for d in items} == {"web-1"}
    status, out, _ = run(capsys, "sessions", "list", "--json", "--unix-user", "root", *world.conn())
    assert [d["unix_user"] for d in json_lines(out)] == ["root"]
    status, out, _ = run(
        capsys,
        "sessions", "list", "--json", "--target", world.host.host_id,
        "--program-type", "exec", "--status", "complete", *world.conn(),
    )  # fmt: skip
    assert [d["session_id"] for d in json_lines(out)] == [world.order[1], world.order[3]]
    status, out, _ = run(
        capsys,
        "sessions", "list", "--json", "--target", world.host.host_id,
        "--since", "2026-11-22T09:01:00Z", "--until", "2026-11-22T09:03:00", *world.conn(),
    )  # fmt: skip
    assert [d["session_id"] for d in json_lines(out)] == world.order[2:4]
    status, out, _ = run(capsys, "sessions", "list", "--json", "--limit", "2", *world.conn())
    assert len(json_lines(out)) == 2


def test_paging_follows_the_cursor(world: World) -> None:
    settings = Settings(world.server.url, str(world.token_file), world.pin)
    with Collector.connect(settings, print) as collector:
        collector.page_size = 2
        got = [d["session_id"] for d in collector.sessions({"target_id": world.host.host_id}, 0)]
        assert got == world.order  # 6 sessions over 3 pages, in order, none twice
        assert len(list(collector.sessions({}, 5))) == 5


def test_table_shows_escapes_instead_of_obeying_them(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(
        capsys, "sessions", "list", "--target", world.host.host_id, *world.conn()
    )
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["START", "USER", "UNIX"]
    assert len(lines) == 1 + len(world.order)
    assert world.order[0] in lines[1] and world.order[-1] in lines[-1]
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b]52;c;cHduZWQ=\\x07rm" in out


def test_sessions_show(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    sid = world.order[3]  # the exec session with the escape sequence
    status, out, err = run(capsys, "sessions", "show", sid, *world.conn())
    assert status == 0, err
    fields = dict(line.split(":", 1) for line in out.splitlines())
    for name in remote_cli.SESSION_FIELDS:
        assert name in fields, name
    assert fields["session_id"].strip() == sid and fields["exit_status"].strip() == "1"
    assert fields["recording.state"].strip() == "sealed_verified"
    assert fields["recording.length"].strip() == str(len(world.sealed[sid]))
    assert "\x1b" not in out
    status, out, _ = run(capsys, "sessions", "show", "--json", sid, *world.conn())
    doc = json.loads(out)
    assert doc["command"] == ESCAPE and doc["target_id"] == world.host.host_id


def test_auth_events(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    target = ["--target", world.host.host_id]
    status, out, err = run(capsys, "auth-events", "--json", *target, *world.conn())
    assert status == 0, err
    assert sorted(d["event_id"] for d in json_lines(out)) == ["ev-0", "ev-1", "ev-2"]
    status, out, _ = run(capsys, "auth-events", "--json", "--allowed", "no", *target, *world.conn())
    assert [(d["event_id"], d["reason"]) for d in json_lines(out)] == [("ev-1", "expired")]
    status, out, _ = run(capsys, "auth-events", "--allowed", "no", *target, *world.conn())
    assert out.splitlines()[0].split()[:2] == ["TIME", "ALLOWED"] and "expired" in out


# --- downloads


def test_download_is_byte_identical(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sid = world.order[0]
    out_file = tmp_path / "s.sealed"
    status, _, err = run(capsys, "download", sid, "-o", str(out_file), *world.conn())
    assert status == 0, err
    assert out_file.read_bytes() == world.sealed[sid]
    assert not Path(f"{out_file}.part").exists()
    assert "resumed" not in err and f"{len(world.sealed[sid])} bytes" in err


def test_download_resumes_a_part_file(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sid = world.order[1]
    data = world.sealed[sid]
    out_file = tmp_path / "s.sealed"
    cut = len(split_sealed(data).prefix) + 50  # the whole header and a part of a frame
    Path(f"{out_file}.part").write_bytes(data[:cut])
    status, _, err = run(capsys, "download", sid, "-o", str(out_file), *world.conn())
    assert status == 0, err
    assert out_file.read_bytes() == data and f"resumed at byte {cut}" in err
    Path(f"{out_file}.part").write_bytes(data)  # all there already: 416, nothing to fetch
    status, _, err = run(capsys, "download", sid, "-o", str(out_file), *world.conn())
    assert status == 0, err
    assert out_file.read_bytes() == data
    Path(f"{out_file}.part").write_bytes(data + b"junk")  # longer: not this recording
    status, _, err = run(capsys, "download", sid, "-o", str(out_file), *world.conn())
    assert status == 0 and "does not fit" in err
    assert out_file.read_bytes() == data


def test_a_part_file_of_another_session_is_not_resumed(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sid, other = world.order[0], world.order[2]
    out_file = tmp_path / "s.sealed"
    for cut in (20, 200, 2000):  # inside the header, and past it
        Path(f"{out_file}.part").write_bytes(world.sealed[other][:cut])
        status, _, err = run(capsys, "download", sid, "-o", str(out_file), *world.conn())
        assert status == 0 and "not resuming" in err, err
        assert out_file.read_bytes() == world.sealed[sid]


def test_an_open_recording_downloads_with_a_warning(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sid = world.order[-1]
    out_file = tmp_path / "open.sealed"
    status, _, err = run(capsys, "download", sid, "-o", str(out_file), *world.conn())
    assert status == 0, err
    assert out_file.read_bytes() == world.sealed[sid] and "still open" in err


def _response(status: int, **headers: str) -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp.headers.update(headers)
    return resp


def test_lengths_must_agree_with_the_etag_and_content_range() -> None:
    assert _expected(_response(200, **{"Content-Length": "10", "ETag": '"len-10"'}), 0) == (10, 10)
    ok206 = {"Content-Length": "6", "ETag": '"len-10"', "Content-Range": "bytes 4-9/10"}
    assert _expected(_response(206, **ok206), 4) == (6, 10)
    bad = [
        (200, {"Content-Length": "9", "ETag": '"len-10"'}, 0),
        (200, {"ETag": '"len-10"'}, 0),
        (200, {"Content-Length": "10", "ETag": 'W/"x"'}, 0),
        (206, {**ok206, "Content-Range": "bytes 3-9/10"}, 4),
        (206, {**ok206, "Content-Range": "bytes 4-9/11"}, 4),
        (206, {**ok206, "Content-Length": "5"}, 4),
    ]
    for status, headers, have in bad:
        with pytest.raises(SSHAuditError):
            _expected(_response(status, **headers), have)


def test_progress_bar_redraws_in_place() -> None:
    written: list[str] = []
    now = [0.0]
    bar = remote_cli.ProgressBar(written.append, lambda: now[0])
    bar.update(0, 4 << 20)
    now[0] = 0.05
    bar.update(1 << 20, 4 << 20)  # too soon: skipped
    now[0] = 0.2
    bar.update(2 << 20, 4 << 20)
    bar.update(4 << 20, 4 << 20)  # the end is always drawn
    bar.finish()
    assert len(written) == 4 and written[-1] == "\n"
    assert written[1].startswith("\r[" + "#" * 15 + "." * 15 + "]  50%")
    assert "4.0 of 4.0 MiB" in written[2]


# --- refusals: one line, the error code, never the token


def test_refusals_are_one_line_with_the_code(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bogus = world.token_path("sa_auditor_" + "A" * 43, "bogus.token")
    admin = world.new_token("admin")
    cases = [
        (world.conn(bogus), "token rejected by the collector (invalid_token)"),
        (world.conn(world.token_path(admin, "admin.token")), "this token's role may not list"),
        (world.conn(world.token_path(world.host.credential, "host.token")), "wrong_role"),
    ]
    for conn, message in cases:
        status, out, err = run(capsys, "sessions", "list", *conn)
        assert (status, out) == (1, "") and message in err
        assert err.count("\n") == 1 and err.startswith("sshaudit: ")
        for secret in (admin, world.host.credential, world.token):
            assert secret not in err
    status, _, err = run(
        capsys, "sessions", "show", "7f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0", *world.conn()
    )
    assert status == 1 and "unknown_session" in err
    status, _, err = run(capsys, "download", "../../etc", "-o", str(tmp_path / "x"), *world.conn())
    assert status == 2 and "not a session id" in err


def test_a_wrong_pin_sends_nothing(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    before = sum('"GET /v1/sessions' in line for line in world.server.log)
    status, _, err = run(capsys, "sessions", "list", *world.conn(pin="SHA256:" + "ab" * 32))
    assert status == 1 and "not the pinned one" in err and world.token not in err
    assert sum('"GET /v1/sessions' in line for line in world.server.log) == before


def test_settings_come_from_the_config_file_and_flags_override(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "sshaudit" / "auditor.toml"
    conf.parent.mkdir()
    conf.write_text(
        f'collector = "{world.server.url}"\ntoken_file = "{world.token_file}"\n'
        f'fingerprint = "SHA256:{"00" * 32}"\n'
    )
    env = {"XDG_CONFIG_HOME": str(tmp_path), "HOME": "/nonexistent"}
    got = load_settings({"fingerprint": world.pin}, None, env)
    assert got == Settings(world.server.url, str(world.token_file), world.pin)
    status, out, err = run(
        capsys, "sessions", "list", "--json", "--config", str(conf), "--fingerprint", world.pin
    )
    assert status == 0 and len(json_lines(out)) == len(world.sealed) + 1, err


def test_bad_settings_are_usage_errors(world: World, tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}  # no config file there
    with pytest.raises(UsageError, match="no collector: give --collector"):
        load_settings({}, None, env)
    flags = {"collector": "http://127.0.0.1:1", "token_file": "t", "fingerprint": world.pin}
    with pytest.raises(UsageError, match="https://"):
        load_settings(flags, None, env)
    bad = tmp_path / "bad.toml"
    bad.write_text('collector = "https://x"\npassword = "hunter2"\n')
    with pytest.raises(UsageError, match="unknown key 'password'"):
        load_settings({}, str(bad), env)
    with pytest.raises(UsageError, match="no such config file"):
        load_settings({}, str(tmp_path / "missing.toml"), env)
    with pytest.raises(UsageError, match="not a time"):
        iso_time("yesterday", "--since")
    assert iso_time("2026-11-22T10:00:00+01:00", "--since") == "2026-11-22T09:00:00.000000Z"


def test_token_file_problems(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = world.token_path("", "empty.token")
    status, _, err = run(capsys, "sessions", "list", *world.conn(empty))
    assert status == 2 and "one token on one line" in err
    loose = world.token_path(world.token, "loose.token")
    os.chmod(loose, 0o644)
    status, _, err = run(capsys, "sessions", "list", "--limit", "1", *world.conn(loose))
    assert status == 0 and "readable by others" in err and world.token not in err


def test_an_unwritable_output_is_one_line(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "no-such-dir" / "s.sealed"
    status, _, err = run(capsys, "download", world.order[0], "-o", str(target), *world.conn())
    assert status == 2 and "No such file or directory" in err and err.count("\n") == 1
