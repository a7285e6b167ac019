"""The recorder starts lean (issue 3: ``ssh host true`` <= 1.05x plain sshd, RSS <= 15 MiB).

The recorder is sshd's ForceCommand, so its imports are paid at every login. These tests
hold the line on module NAMES (never on times, the machine is shared): the launcher run
with ``-X importtime`` on ``--help``, on the recorder's whole import set and on a real exec
session through a scripted daemon imports none of the heavy modules, and nothing beyond a
short list of cheap ones. The stand-ins that make that possible (agent/protocol.py's
Frozen, IntCode/StrCode and JSON through ``_json``; recorder_config's TOML subset) are
checked against what they replace: json.dumps/json.loads and tomllib, fuzzed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import toml_text
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import sshaudit
from sshaudit.agent import protocol
from sshaudit.agent.launcher import write_launcher
from sshaudit.agent.protocol import MsgType, Stream, json_dumps, json_loads
from sshaudit.agent.record import ProgramType
from sshaudit.agent.recorder_config import DownPolicy, lean_toml, parse
from sshaudit.agent.relay_exec import EMPTY_SHA256
from sshaudit.errors import ConfigError

PACKAGE_PARENT = str(Path(sshaudit.__file__).parent.parent)  # not resolved: the link tree
EXAMPLE = (Path(__file__).parent.parent / "docs" / "agent.example.toml").read_text()
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# What the recorder used to import, and what must stay out (each costs ms at every login).
HEAVY = {
    "dataclasses", "inspect", "typing", "enum", "re", "json", "tomllib", "contextlib",
    "collections", "functools", "signal", "socket", "selectors", "hashlib", "_hashlib",
    "datetime", "pathlib", "argparse", "tempfile", "pydantic", "cryptography", "psutil",
}  # fmt: skip
# Everything the recorder may add to a bare ``python -I -S`` (Python 3.11): cheap modules.
CHEAP = {
    "__future__", "_socket", "os", "stat", "_stat", "_collections_abc", "posixpath",
    "genericpath", "pwd", "struct", "_struct", "_json", "errno", "select", "fcntl",
    "termios", "tty", "resource", "sshaudit", "sshaudit.errors", "sshaudit.agent",
    "sshaudit.agent.protocol", "sshaudit.agent.recorder_config",
    "sshaudit.agent.relay_common", "sshaudit.agent.record", "sshaudit.agent.relay_pty",
    "sshaudit.agent.relay_exec",
}  # fmt: skip
RECORDER_IMPORTS = (
    f"import sys; sys.path.insert(0, {PACKAGE_PARENT!r}); "
    "import sshaudit.agent.record, sshaudit.agent.relay_pty, sshaudit.agent.relay_exec"
)


def imported(args: list[str], **kw: Any) -> tuple[set[str], subprocess.CompletedProcess[bytes]]:
    """The modules ``python -I -S -X importtime ARGS`` imports beyond a bare interpreter."""

    def names(stderr: bytes) -> set[str]:
        lines = stderr.decode(errors="replace").splitlines()
        rows = [x for x in lines if x.startswith("import time:") and "cumulative" not in x]
        return {x.rsplit("|", 1)[1].strip() for x in rows}

    cmd = [sys.executable, "-I", "-S", "-X", "importtime"]
    bare = subprocess.run([*cmd, "-c", "pass"], capture_output=True, timeout=30, check=True)
    done = subprocess.run([*cmd, *args], capture_output=True, timeout=60, check=False, **kw)
    return names(done.stderr) - names(bare.stderr), done


def assert_lean(mods: set[str]) -> None:
    assert mods & HEAVY == set(), "heavy modules on the login path"
    assert mods - CHEAP == set(), "new modules on the login path: measure them, then list"


@pytest.fixture
def launcher(tmp_path: Path) -> Path:
    path = tmp_path / "record"
    write_launcher(str(path), sys.executable, PACKAGE_PARENT)
    return path


def test_help_imports_only_cheap_modules(launcher: Path) -> None:
    mods, done = imported([str(launcher), "--help"])
    assert done.returncode == 0 and done.stdout.startswith(b"NAME\n")
    assert "sshaudit.agent.record" in mods  # the measurement sees the recorder at all
    assert_lean(mods)


def test_the_recorders_import_set_is_cheap() -> None:
    mods, done = imported(["-c", RECORDER_IMPORTS])
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"sshaudit.agent.relay_pty", "sshaudit.agent.relay_exec"} <= mods
    assert_lean(mods)


def _stand_in(path: str, ends: list[dict[str, Any]]) -> threading.Thread:
    """A scripted daemon for one recorder: ACCEPT its HELLO, DONE its END."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    accept = {"session_id": "s", "record_input": True, "exec_capture_cap": 1 << 20}

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            decoder = protocol.Decoder()
            while chunk := conn.recv(1 << 16):
                for msg in decoder.feed(chunk):
                    if msg.type is MsgType.HELLO:
                        doc = {**accept, "exec_hash": True}
                        conn.sendall(protocol.encode_json(MsgType.ACCEPT, doc))
                    elif msg.type is MsgType.END:
                        ends.append(msg.json())
                        conn.sendall(protocol.encode_json(MsgType.DONE, {}))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(("command", "stdout"), [("true", b""), ("echo hi", b"hi\n")])
def test_a_recorded_exec_session_stays_lean(
    launcher: Path, tmp_path: Path, command: str, stdout: bytes
) -> None:
    """hashlib (libcrypto) loads only when a hashed stream carries bytes: never for
    ``ssh host true``; the digest of an empty stream is the known constant."""
    sock = str(tmp_path / "agent.sock")
    ends: list[dict[str, Any]] = []
    thread = _stand_in(sock, ends)
    config = tmp_path / "agent.toml"
    config.write_text(f'socket = "{sock}"\n')
    env = {"PATH": os.environ["PATH"], "SSH_ORIGINAL_COMMAND": command}
    cmd = [str(launcher), "--config", str(config)]
    mods, done = imported(cmd, env=env, stdin=subprocess.DEVNULL)  # no pty: an exec session
    thread.join(10)
    assert (done.returncode, done.stdout) == (0, stdout), done.stderr[-2000:]
    (end,) = ends
    assert end["streams"]["stdout"]["sha256"] == hashlib.sha256(stdout).hexdigest()
    assert end["streams"]["stderr"]["sha256"] == EMPTY_SHA256
    if stdout:
        assert {"hashlib", "_hashlib"} <= mods  # loaded when needed, mid-session
        mods -= {"hashlib", "_hashlib", "_blake2"}
    assert_lean(mods)


def test_empty_sha256_is_sha256_of_nothing() -> None:
    assert hashlib.sha256(b"").hexdigest() == EMPTY_SHA256


# -- Frozen and IntCode/StrCode keep the dataclass/enum contracts the code relies on ------


def test_frozen_values_behave_as_frozen_dataclasses() -> None:
    a, b = protocol.Data(0.5, Stream.INPUT, b"x"), protocol.Data(0.5, Stream.INPUT, b"x")
    assert a == b and hash(a) == hash(b) and a != protocol.Data(0.5, Stream.INPUT, b"y")
    assert a != protocol.Marker(0.5, "x") and (a == (0.5, Stream.INPUT, b"x")) is False
    assert repr(a) == "Data(time=0.5, stream=<Stream.INPUT: 105>, data=b'x')"
    with pytest.raises(AttributeError):
        a.time = 1.0  # frozen at run time (mypy sees plain attributes)
    with pytest.raises(AttributeError):
        del a.data
    assert copy.deepcopy(a) == a and pickle.loads(pickle.dumps(a)) == a
    with pytest.raises(TypeError):
        protocol.Resize(0.1, 2)  # type: ignore[call-arg]


def test_codes_behave_as_enums() -> None:
    assert MsgType(9) is MsgType.PAM and MsgType.PAM.name == "PAM" and MsgType.PAM == 9
    assert (MsgType.DONE.value, str(MsgType.DONE), repr(MsgType.DONE)) == (
        8,
        "8",
        "<MsgType.DONE: 8>",
    )
    assert Stream(ord("e")) is Stream.ERROR and isinstance(Stream.ERROR, Stream)
    for bad in (0, 11, "1", None, [1]):
        with pytest.raises(ValueError, match="is not a valid MsgType"):
            MsgType(bad)
    assert DownPolicy("allow") is DownPolicy.ALLOW and DownPolicy.ALLOW.value == "allow"
    assert type(ProgramType.EXEC.value) is str and ProgramType.EXEC.name == "EXEC"
    for code in (MsgType.END, DownPolicy.DENY):
        assert pickle.loads(pickle.dumps(code)) is code and copy.copy(code) is code


# -- JSON: the same text as json.dumps, the same values and refusals as json.loads --------

SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
JSON_LIKE = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=4)
    ),
    max_leaves=25,
)


def nested(depth: int) -> object:
    doc: object = "leaf"
    for i in range(depth):
        doc = [doc] if i % 2 else {"k": doc}
    return doc


@FUZZ
@given(JSON_LIKE)
@example({"a": "\ud800 lone surrogate", "b": '\x00\x1f\x7f\u2028é😀"\\/'})
@example({"code": MsgType.DONE, "policy": DownPolicy.DENY, "big": 10**40, "neg": -(2**70)})
@example(nested(40))  # deeper than the small encoder goes: json.dumps writes it
@example(float("nan"))
def test_json_dumps_is_json_dumps(value: object) -> None:
    assert json_dumps(value) == json.dumps(value, separators=(",", ":"))


def test_json_dumps_refuses_what_json_refuses() -> None:
    loop: list[object] = []
    loop.append(loop)
    for bad in ({"k": {1, 2}}, loop, {(1, 2): 3}):
        with pytest.raises((TypeError, ValueError)) as mine:
            json_dumps(bad)
        with pytest.raises(type(mine.value)):
            json.dumps(bad, separators=(",", ":"))


def outcome(load: Any, text: str) -> tuple[str, str]:
    try:
        return ("ok", repr(load(text)))  # repr: NaN compares equal to itself this way
    except ValueError:
        return ("ValueError", "")
    except RecursionError:
        return ("RecursionError", "")


JSON_TEXT = st.one_of(
    JSON_LIKE.map(lambda v: json.dumps(v, indent=1)),
    st.text(alphabet=' \t\n\r{}[]",:0123456789.eE+-truefalsnNIiy\\u\ufeff\x00', max_size=40),
    st.tuples(JSON_LIKE.map(json.dumps), st.integers(0, 60), st.sampled_from('"]},: x\\')).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]
    ),
)


@FUZZ
@given(JSON_TEXT)
@example("\ufeff{}")
@example(' \n{"a": [1, 2.5e3, -0, NaN, Infinity, -Infinity, "\\u00e9\\ud83d\\ude00"]}\r\n ')
@example('{"a": 1} x')
@example('{"a": 1, "a": 2}')
@example("")
@example('"\x01"')  # a raw control character inside a string: json refuses it (strict)
@example("[" * 5000)
def test_json_loads_is_json_loads(text: str) -> None:
    assert outcome(json_loads, text) == outcome(json.loads, text)


def test_a_deeply_nested_message_is_a_protocol_error() -> None:
    """The module's invariant: malformed input raises ProtocolError, nothing else (json
    raises RecursionError here, which used to escape)."""
    with pytest.raises(protocol.ProtocolError):
        protocol.Message(MsgType.HELLO, b"[" * 100_000).json()


# -- TOML: the subset gives tomllib's document, or leaves the file to tomllib -------------

KEYS = ["socket", "policy", "on_daemon_down", "break_glass_users", "a", "b-c", "1", "x_y"]
ODD_KEYS = ["", "a.b", '"q"', "é", "a b", "[x]"]
VALUES = [
    '"/run/s.sock"', '"deny"', '"allow"', "'li\\t'", '""', "''", '"a\\"b"', '"tab\there"',
    '"""ml"""', "'''ml'''", "true", "false", "truex", "0", "7", "01", "1.0", "0.25", "1.",
    ".5", "1e5", "-1", "+1", "1_000", "0x1f", "inf", "nan", "1979-05-27", "07:32:00",
    "{a = 1}", "[]", '["ops", "root"]', "[1, 'a', true, 2.5,]", '[\n  "x", # c\n  "y",\n]',
    "[[1]]", "[,]", "[1 2]", "[1,,2]", "12345678901234567890123", '"un', '"a" "b"', "",
    '"a\\\\b"', '"\\u00e9"', '"x\\ty"', "'a\\'",
]  # fmt: skip
LINE = st.one_of(
    st.tuples(
        st.sampled_from(KEYS) | st.sampled_from(ODD_KEYS),
        st.sampled_from(["=", " = ", "\t=  ", " ", "=="]),
        st.sampled_from(VALUES) | st.text(max_size=6),
        st.sampled_from(["", "  # note", "# é \t", "#\x01", " x"]),
    ).map("".join),
    st.sampled_from(["[policy]", "[other]", "[a.b]", "[[t]]", "[ policy ]", "[policy] # c"]),
    st.sampled_from(["", "   ", "# comment", "\t# tab", "#\x7f"]),
    st.text(max_size=12),
)
TOML_DOC = st.tuples(st.lists(LINE, max_size=12), st.sampled_from(["\n", "\r\n", "\r"])).map(
    lambda t: t[1].join(t[0])
)
MUTATED_EXAMPLE = st.tuples(
    st.integers(0, len(EXAMPLE)), st.integers(0, 3), st.text("\"'[]#=,.\n\r\t x0-\\", max_size=3)
).map(lambda t: EXAMPLE[: t[0]] + t[2] + EXAMPLE[t[0] + t[1] :])


def check_subset(text: str) -> str:
    lean = lean_toml(text)
    if lean is None:
        return "tomllib"
    assert tomllib.loads(text) == lean  # accepted by the subset: valid TOML, same values
    return "subset"


@FUZZ
@given(TOML_DOC | MUTATED_EXAMPLE)
def test_the_toml_subset_agrees_with_tomllib(text: str) -> None:
    event(check_subset(text))


@pytest.mark.parametrize("text", [*VALUES, *ODD_KEYS, "a = 1\rb = 2", "\ufeffa = 1", "\x00"])
def test_tricky_values_in_the_subset_or_left_to_tomllib(text: str) -> None:
    check_subset(f"a = {text}\n")
    check_subset(text)
    check_subset(f"a = 1\n[{text}]\nb = 2")


def test_the_documented_and_generated_configs_take_the_fast_path() -> None:
    """The subset is worth having only if real configs are in it."""
    doc = {"socket": "/run/x.sock", "spool_dir": "/s", "recipients": ["/k1", "/k2"]}
    policy = {"on_daemon_down": "allow", "break_glass_users": ["ops"], "frame_interval": 0.5}
    for text in (EXAMPLE, toml_text({**doc, "policy": policy}), ""):
        assert lean_toml(text) == tomllib.loads(text)
        assert lean_toml(text.replace("\n", "\r\n")) == tomllib.loads(text)


def test_config_errors_are_the_same_on_both_paths() -> None:
    """Outside the subset tomllib decides (its error); inside, the same checks run."""
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse('socket = "/s"\nsocket = "/t"\n')  # a duplicate key: the subset gives up
    with pytest.raises(ConfigError, match="on_daemon_down"):
        parse('[policy]\non_daemon_down = "Allow"\n')  # in the subset: policy check
    slow = parse('socket = "\\u002Fs"\n[policy]\nbreak_glass_users = ["o\\u0070s"]\n')
    assert (slow.socket, slow.break_glass_users) == ("/s", frozenset({"ops"}))
