"""Basic authentication (``http/access.py``) with real bcrypt, and the cold-build
quota (``store/quota.py``) on real files shared by processes."""

from __future__ import annotations

import base64
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import trio

from nixery_trio.core.errors import Unauthorized
from nixery_trio.http import access
from nixery_trio.http.access import BasicAuth
from nixery_trio.store.quota import ColdBuildQuota


def htpasswd(path: Path, **users: str) -> Path:
    hashed = {user: bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)) for user, password
              in users.items()}  # fmt: skip
    lines = [f"{user}:{digest.decode()}" for user, digest in hashed.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def scope(user: str | None = None, password: str = "", raw: bytes | None = None) -> dict[str, Any]:
    headers = [(b"host", b"x")]
    if raw is not None:
        headers.append((b"authorization", raw))
    elif user is not None:
        encoded = base64.b64encode(f"{user}:{password}".encode())
        headers.append((b"Authorization", b"Basic " + encoded))
    return {"headers": headers, "client": ("192.0.2.1", 5000)}


async def test_right_credentials_pass_and_wrong_ones_get_the_challenge(tmp_path: Path) -> None:
    auth = BasicAuth(htpasswd(tmp_path / "htpasswd", alice="s3cret", bob="pässword"))
    assert await auth.user(scope("alice", "s3cret")) == "alice"
    assert await auth.user(scope("bob", "pässword")) == "bob"
    for bad in (scope(), scope("alice", "wrong"), scope("carol", "s3cret"),
                scope(raw=b"Bearer abc"), scope(raw=b"Basic !!!"),
                scope(raw=b"Basic " + base64.b64encode(b"no-colon")),
                scope("alice", "x" * 100)):  # fmt: skip
        with pytest.raises(Unauthorized) as caught:
            await auth.user(bad)
        assert caught.value.status == 401
        assert caught.value.headers() == {
            "WWW-Authenticate": 'Basic realm="nixery-trio", charset="UTF-8"'
        }


@pytest.fixture
def bcrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The passwords bcrypt checks from now on (it still checks them)."""
    calls: list[bytes] = []
    real = access._checkpw
    monkeypatch.setattr(access, "_checkpw", lambda p, h: calls.append(p) or real(p, h))
    return calls


async def test_a_header_that_checked_out_skips_bcrypt(
    tmp_path: Path, bcrypt_calls: list[bytes]
) -> None:
    auth = BasicAuth(htpasswd(tmp_path / "htpasswd", alice="s3cret"))
    calls = bcrypt_calls
    for _ in range(5):
        assert await auth.user(scope("alice", "s3cret")) == "alice"
    assert len(calls) == 1
    for _ in range(2):  # a wrong password is checked every time
        with pytest.raises(Unauthorized):
            await auth.user(scope("alice", "nope"))
    assert len(calls) == 3


async def test_one_check_answers_the_same_header_on_many_connections(
    tmp_path: Path, bcrypt_calls: list[bytes]
) -> None:
    auth = BasicAuth(htpasswd(tmp_path / "htpasswd", alice="s3cret"))
    calls = bcrypt_calls
    users: list[str] = []
    refused: list[int] = []

    async def ask(password: str) -> None:
        try:
            users.append(await auth.user(scope("alice", password)))
        except Unauthorized:
            refused.append(1)

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(ask, "s3cret")
        for _ in range(4):
            nursery.start_soon(ask, "wrong")
    assert users == ["alice"] * 8 and len(refused) == 4
    assert len(calls) == 2  # once per distinct header


async def test_the_file_is_read_again_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = htpasswd(tmp_path / "htpasswd", alice="one")
    auth = BasicAuth(path)
    monkeypatch.setattr(access, "RELOAD_SECONDS", 0.0)
    assert await auth.user(scope("alice", "one")) == "alice"
    htpasswd(tmp_path / "new", alice="two", bob="three").replace(path)
    with pytest.raises(Unauthorized):  # a remembered header is forgotten with the old file
        await auth.user(scope("alice", "one"))
    assert await auth.user(scope("alice", "two")) == "alice"
    assert await auth.user(scope("bob", "three")) == "bob"
    path.write_text("broken\n")  # an invalid file keeps the users read before
    os.utime(path, ns=(1, 1))
    assert await auth.user(scope("bob", "three")) == "bob"


def test_quota_counts_per_client_and_says_when_to_retry(tmp_path: Path) -> None:
    quota = ColdBuildQuota(tmp_path, 2)
    assert quota.charge("address 192.0.2.1") is None
    assert quota.charge("address 192.0.2.1") is None
    retry = quota.charge("address 192.0.2.1")
    assert retry is not None and 55 <= retry <= 60
    assert quota.charge("address 192.0.2.2") is None  # another client
    assert quota.charge("user alice") is None
    # No file names a client.
    names = [p.name for p in (tmp_path / "run" / "quota").iterdir()]
    assert len(names) == 3 and not any("192" in n or "alice" in n for n in names)


def test_quota_window_slides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    quota = ColdBuildQuota(tmp_path, 1)
    now = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    assert quota.charge("c") is None
    now[0] += 45
    assert quota.charge("c") == 15
    now[0] += 15.5
    assert quota.charge("c") is None


def test_a_damaged_quota_file_or_missing_folder_is_no_failure(tmp_path: Path) -> None:
    quota = ColdBuildQuota(tmp_path, 1)
    assert quota.charge("c") is None
    for file in (tmp_path / "run" / "quota").iterdir():
        file.write_bytes(b"\xc1garbage")
    assert quota.charge("c") is None  # the damaged count is dropped
    (tmp_path / "run" / "quota").rename(tmp_path / "gone")
    assert quota.charge("c") is None  # the folder is made again, the count starts afresh
    assert (tmp_path / "run" / "quota").is_dir()


def _charge_many(root: str, times: int, results: Any) -> None:
    quota = ColdBuildQuota(Path(root), 10)
    results.put(sum(quota.charge("shared") is None for _ in range(times)))


def test_quota_is_shared_by_processes(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=_charge_many, args=(str(tmp_path), 8, results))
               for _ in range(3)]  # fmt: skip
    for worker in workers:
        worker.start()
    allowed = sum(results.get(timeout=30) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
    assert allowed == 10
