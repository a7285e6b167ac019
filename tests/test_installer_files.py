"""The file transaction on real files: backup manifest first, atomic writes, rollback after a
failure, byte-for-byte restore (content, mode, owner), refusal when edited since."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sshaudit.errors import ConfigError
from sshaudit.installer.files import (
    MANIFEST,
    FileChange,
    apply,
    read_text,
    restore_all,
    rollback,
    unified_diff,
    write_atomic,
)

ORIGINAL = b"Port 22\r\n# caf\xc3\xa9 \xff not utf-8\nno newline at end"


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    etc = tmp_path / "etc"
    etc.mkdir()
    config = etc / "sshd_config"
    config.write_bytes(ORIGINAL)
    config.chmod(0o640)
    pam = etc / "pam_sshd"
    pam.write_bytes(b"session required x.so\n")
    pam.chmod(0o600)
    return {"config": config, "pam": pam, "new": etc / "agent.toml", "backup": tmp_path / "bk"}


def _state(path: Path) -> tuple[bytes, int, int, int] | None:
    if not path.exists():
        return None
    info = path.stat()
    return path.read_bytes(), info.st_mode & 0o7777, info.st_uid, info.st_gid


def _changes(tree: dict[str, Path], tag: str = "v1") -> list[FileChange]:
    config_text = read_text(tree["config"])
    assert config_text is not None
    return [
        FileChange(tree["config"], f"# {tag}\n" + config_text),
        FileChange(tree["pam"], f"# {tag}\nsession required x.so\n", 0o644),
        FileChange(tree["new"], f"[agent] # {tag}\n", 0o600),
    ]


def test_apply_then_restore_is_byte_identical(tree: dict[str, Path]) -> None:
    paths = [tree["config"], tree["pam"], tree["new"]]
    before = {p: _state(p) for p in paths}
    apply(_changes(tree), tree["backup"])
    assert tree["config"].read_bytes() == b"# v1\n" + ORIGINAL  # surrogateescape round trip
    assert _state(tree["new"])[1:2] == (0o600,)  # type: ignore[index]
    assert _state(tree["pam"])[1:2] == (0o644,)  # type: ignore[index]
    assert tree["backup"].stat().st_mode & 0o777 == 0o700
    restored = restore_all(tree["backup"])
    assert sorted(restored) == sorted(paths)
    assert {p: _state(p) for p in paths} == before
    assert not (tree["backup"] / MANIFEST).exists()
    assert restore_all(tree["backup"]) == []  # nothing enrolled any more


def test_restore_puts_back_owner(tree: dict[str, Path]) -> None:
    if os.geteuid() != 0:
        pytest.skip("NOT RUN: changing file owners needs root")
    os.chown(tree["config"], 65534, 65534)
    apply(_changes(tree), tree["backup"])
    assert _state(tree["config"])[2:] == (65534, 65534)  # type: ignore[index]
    os.chown(tree["config"], 0, 0)  # someone chowns it: restore puts the original back
    restore_all(tree["backup"])
    assert _state(tree["config"]) == (ORIGINAL, 0o640, 65534, 65534)


def test_manifest_is_written_before_any_target(tree: dict[str, Path]) -> None:
    order: list[Path] = []

    def writer(path: Path, data: bytes, mode: int, uid: int, gid: int) -> None:
        order.append(path)
        write_atomic(path, data, mode, uid, gid)

    apply(_changes(tree), tree["backup"], writer=writer)
    targets = [tree["config"], tree["pam"], tree["new"]]
    manifest_at = order.index(tree["backup"] / MANIFEST)
    assert all(order.index(t) > manifest_at for t in targets)
    assert all("originals" in str(p) for p in order[:manifest_at])
    manifest = json.loads((tree["backup"] / MANIFEST).read_text())
    new_entry = next(e for e in manifest["files"] if e["path"] == str(tree["new"]))
    assert new_entry["original_sha256"] is None and new_entry["backup"] is None


def test_failure_midway_rolls_everything_back(tree: dict[str, Path]) -> None:
    paths = [tree["config"], tree["pam"], tree["new"]]
    before = {p: _state(p) for p in paths}

    def failing(path: Path, data: bytes, mode: int, uid: int, gid: int) -> None:
        if path == tree["new"]:
            raise ConfigError("disk full (simulated)")
        write_atomic(path, data, mode, uid, gid)

    with pytest.raises(ConfigError, match="simulated"):
        apply(_changes(tree), tree["backup"], writer=failing)
    assert {p: _state(p) for p in paths} == before
    assert not (tree["backup"] / MANIFEST).exists()
    assert list((tree["backup"] / "originals").iterdir()) == []


def test_explicit_rollback(tree: dict[str, Path]) -> None:
    before = {p: _state(p) for p in (tree["config"], tree["new"])}
    applied = apply(_changes(tree), tree["backup"])
    rollback(applied)  # e.g. sshd -t refused the result
    assert {p: _state(p) for p in (tree["config"], tree["new"])} == before
    assert not (tree["backup"] / MANIFEST).exists()


def test_reenroll_keeps_the_original_backup(tree: dict[str, Path]) -> None:
    assert apply(_changes(tree, "v1"), tree["backup"]).edited_since == ()
    second = apply(_changes(tree, "v2"), tree["backup"])
    assert second.edited_since == ()
    assert tree["config"].read_bytes().startswith(b"# v2\n# v1\n")
    rollback(second)  # a failed re-enroll goes back to the first enrollment, not further
    assert tree["config"].read_bytes().startswith(b"# v1\n")
    tree["pam"].write_text("session required admin-edit.so\n")
    third = apply(_changes(tree, "v3"), tree["backup"])
    assert third.edited_since == (tree["pam"],)
    restore_all(tree["backup"])
    assert _state(tree["config"]) == (ORIGINAL, 0o640, os.geteuid(), os.getegid())
    assert not tree["new"].exists()


def test_restore_refuses_files_edited_since(tree: dict[str, Path]) -> None:
    apply(_changes(tree), tree["backup"])
    tree["pam"].write_text("session required admin-edit.so\n")
    with pytest.raises(ConfigError, match="changed since") as caught:
        restore_all(tree["backup"])
    assert str(tree["pam"]) in str(caught.value) and str(tree["config"]) not in str(caught.value)
    assert tree["config"].read_bytes().startswith(b"# v1\n")  # nothing restored
    restore_all(tree["backup"], force=True)
    assert tree["pam"].read_bytes() == b"session required x.so\n"


def test_interrupt_during_apply_rolls_back(tree: dict[str, Path]) -> None:
    def interrupted(path: Path, data: bytes, mode: int, uid: int, gid: int) -> None:
        write_atomic(path, data, mode, uid, gid)
        if path.name == MANIFEST:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        apply(_changes(tree), tree["backup"], writer=interrupted)
    assert not (tree["backup"] / MANIFEST).exists()
    assert tree["config"].read_bytes() == ORIGINAL


def test_restore_after_a_crash_between_manifest_and_writes(tree: dict[str, Path]) -> None:
    """A killed enroll leaves the manifest and some targets unwritten: unenroll still works
    (a file that is still the original is not "edited since")."""
    apply(_changes(tree), tree["backup"])
    tree["config"].write_bytes(ORIGINAL)  # as if the crash came before this write
    tree["new"].unlink()
    assert sorted(restore_all(tree["backup"])) == sorted([tree["config"], tree["pam"], tree["new"]])
    assert tree["config"].read_bytes() == ORIGINAL and not tree["new"].exists()


def test_damaged_backup_refused(tree: dict[str, Path]) -> None:
    apply(_changes(tree), tree["backup"])
    copies = list((tree["backup"] / "originals").iterdir())
    assert len(copies) == 2  # config and pam; the new file was absent
    for copy in copies:
        assert copy.stat().st_mode & 0o777 == 0o600
        copy.write_bytes(b"tampered")
    with pytest.raises(ConfigError, match="damaged"):
        restore_all(tree["backup"])
    assert tree["config"].read_bytes().startswith(b"# v1\n")  # nothing restored


@pytest.mark.parametrize(
    "bad",
    [
        lambda t: [FileChange(Path("relative"), "x")],
        lambda t: [FileChange(t["config"], "x"), FileChange(t["config"], "y")],
        lambda t: [FileChange(t["config"].parent / "nodir" / "f", "x")],
        lambda t: [FileChange(t["config"], "x", 0o170000)],
    ],
)
def test_bad_changes_refused_before_anything(tree: dict[str, Path], bad: object) -> None:
    with pytest.raises(ConfigError):
        apply(bad(tree), tree["backup"])  # type: ignore[operator]
    assert tree["config"].read_bytes() == ORIGINAL
    assert not tree["backup"].exists()


def test_symlink_target_refused(tree: dict[str, Path]) -> None:
    link = tree["config"].parent / "link"
    link.symlink_to(tree["config"])
    with pytest.raises(ConfigError, match="not a regular file"):
        apply([FileChange(link, "x")], tree["backup"])
    assert link.is_symlink() and tree["config"].read_bytes() == ORIGINAL


def test_delete_and_restore(tree: dict[str, Path]) -> None:
    apply([FileChange(tree["pam"], None)], tree["backup"])
    assert not tree["pam"].exists()
    restore_all(tree["backup"])
    assert _state(tree["pam"]) == (b"session required x.so\n", 0o600, os.geteuid(), os.getegid())


def test_unified_diff(tree: dict[str, Path]) -> None:
    diff = unified_diff(
        [
            FileChange(tree["pam"], "# added\nsession required x.so\n"),
            FileChange(tree["new"], "new file"),
        ]
    )
    pam_label = str(tree["pam"]).lstrip("/")
    assert f"--- a/{pam_label}\n+++ b/{pam_label}\n" in diff
    assert "+# added\n" in diff and " session required x.so\n" in diff
    assert "+new file\n\\ No newline at end of file\n" in diff
    assert unified_diff([FileChange(tree["pam"], "session required x.so\n")]) == ""
    assert tree["pam"].read_bytes() == b"session required x.so\n"  # dry run wrote nothing
