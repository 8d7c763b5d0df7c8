"""The S3 store's bucket (nixery_trio/store/s3.py) against a real S3 server, SeaweedFS."""

from __future__ import annotations

import hashlib
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("boto3")

from nixery_trio.core.errors import RangeNotSatisfiable, StorageError
from nixery_trio.store.s3 import PART_SIZE, S3Bucket

from .seaweed import ACCESS_KEY, REGION, SECRET_KEY, Seaweed
from .server import wait_for

MiB = 1 << 20


@pytest.fixture
def bucket(seaweed: Seaweed) -> S3Bucket:
    """A new, empty bucket for each test."""
    return S3Bucket(seaweed.endpoint, seaweed.create_bucket(), ACCESS_KEY, SECRET_KEY, REGION)


def chunks(count: int, size: int = MiB) -> Iterator[bytes]:
    """``count`` different chunks of ``size`` bytes, made one at a time."""
    for index in range(count):
        seed = hashlib.sha256(b"%d" % index).digest()
        yield seed * (size // len(seed))


def uploads_of(bucket: S3Bucket, key: str) -> list[str]:
    """The multipart uploads in progress for ``key``."""
    listed = bucket._client.list_multipart_uploads(Bucket=bucket.bucket, Prefix=key)
    return [upload["UploadId"] for upload in listed.get("Uploads", [])]


def test_a_stream_of_several_parts_appears_whole_only_on_commit(bucket: S3Bucket) -> None:
    expected = hashlib.sha256()
    with bucket.put_stream("blobs/layer") as writer:
        for chunk in chunks(20):
            writer.write(chunk)
            expected.update(chunk)
            assert writer.buffered < PART_SIZE
        # Two parts are in S3, the rest in memory: nothing is visible yet.
        assert len(uploads_of(bucket, "blobs/layer")) == 1
        assert bucket.stat("blobs/layer") is None
        assert list(bucket.list("blobs/")) == []
        etag = writer.commit()

    stat = bucket.stat("blobs/layer")
    assert stat == (20 * MiB, etag)
    assert etag.endswith('-3"')  # 8 + 8 + 4 MiB
    data = bucket.get("blobs/layer")
    assert data is not None and len(data) == 20 * MiB
    assert hashlib.sha256(data).digest() == expected.digest()
    assert uploads_of(bucket, "blobs/layer") == []


def test_a_stream_of_whole_parts_only(bucket: S3Bucket) -> None:
    with bucket.put_stream("exact") as writer:
        for chunk in chunks(16):
            writer.write(chunk)
        writer.commit()
    assert bucket.get("exact") == b"".join(chunks(16))


def test_a_stream_holds_at_most_one_part_in_memory(bucket: S3Bucket) -> None:
    total = 40 * MiB
    writes = chunks(40)
    tracemalloc.start()
    try:
        with bucket.put_stream("big") as writer:
            for chunk in writes:
                writer.write(chunk)
            writer.commit()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The part, one chunk being written, and botocore's bookkeeping.
    assert peak < PART_SIZE + 4 * MiB < total
    assert bucket.stat("big") is not None
    assert bucket.stat("big")[0] == total  # type: ignore[index]


def test_leaving_without_commit_or_on_error_aborts(bucket: S3Bucket) -> None:
    with bucket.put_stream("left") as writer:
        for chunk in chunks(10):
            writer.write(chunk)
        assert len(uploads_of(bucket, "left")) == 1
    with pytest.raises(RuntimeError), bucket.put_stream("failed") as writer:
        for chunk in chunks(9):
            writer.write(chunk)
        raise RuntimeError("the build failed")
    with bucket.put_stream("aborted") as writer:
        for chunk in chunks(9):
            writer.write(chunk)
        writer.abort()
        writer.abort()
        with pytest.raises(ValueError):
            writer.write(b"more")

    for key in ("left", "failed", "aborted"):
        assert bucket.stat(key) is None
        assert uploads_of(bucket, key) == []
    assert list(bucket.list("")) == []


def test_small_and_empty_streams_are_one_put(bucket: S3Bucket) -> None:
    with bucket.put_stream("small") as writer:
        writer.write(b"hello, ")
        writer.write(b"world")
        assert uploads_of(bucket, "small") == []
        assert bucket.stat("small") is None
        etag = writer.commit()
    assert etag == '"' + hashlib.md5(b"hello, world").hexdigest() + '"'
    assert bucket.get("small") == b"hello, world"
    with bucket.put_stream("empty") as writer:
        writer.commit()
    assert bucket.get("empty") == b""
    assert bucket.stat("empty") == (0, '"' + hashlib.md5(b"").hexdigest() + '"')


def test_put_if_absent_creates_once(bucket: S3Bucket) -> None:
    etag = bucket.put_if_absent("lease", b"mine")
    assert etag is not None and bucket.stat("lease") == (4, etag)
    assert bucket.put_if_absent("lease", b"theirs") is None
    assert bucket.get("lease") == b"mine"


def test_put_if_absent_racing_has_one_winner(bucket: S3Bucket) -> None:
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda n: bucket.put_if_absent("race", b"%d" % n), range(8)))
    winners = [n for n, etag in enumerate(won) if etag is not None]
    assert len(winners) == 1
    assert bucket.get_tagged("race") == (b"%d" % winners[0], won[winners[0]])


def test_put_if_match_renews_only_with_the_current_etag(bucket: S3Bucket) -> None:
    assert bucket.put_if_absent("lease", b"v1")
    stat = bucket.stat("lease")
    assert stat is not None
    first_etag = stat[1]
    second_etag = bucket.put_if_match("lease", b"v2", first_etag)
    assert second_etag is not None and second_etag != first_etag
    assert bucket.get("lease") == b"v2"
    assert bucket.put_if_match("lease", b"v3", first_etag) is None
    assert bucket.get("lease") == b"v2"
    assert bucket.put_if_match("lease", b"v3", second_etag) is not None
    assert bucket.put_if_match("gone", b"v1", first_etag) is None
    assert bucket.stat("gone") is None


def test_get_range_stat_list_and_delete(bucket: S3Bucket) -> None:
    data = bytes(range(256)) * 4
    for key in ("blobs/a", "blobs/b", "index/x"):
        assert bucket.put_if_absent(key, data)
    assert bucket.get_range("blobs/a", 0, 0) == data[:1]
    assert bucket.get_range("blobs/a", 10, 19) == data[10:20]
    assert bucket.get_range("blobs/a", 1000, 5000) == data[1000:]
    with pytest.raises(RangeNotSatisfiable):
        bucket.get_range("blobs/a", 2000, 3000)
    assert bucket.stat("blobs/a") == (1024, '"' + hashlib.md5(data).hexdigest() + '"')
    assert bucket.get("missing") is None
    assert bucket.stat("missing") is None

    assert list(bucket.list("blobs/")) == ["blobs/a", "blobs/b"]
    assert list(bucket.list("")) == ["blobs/a", "blobs/b", "index/x"]
    bucket.delete("blobs/a")
    bucket.delete("blobs/a")  # gone already: no error
    assert list(bucket.list("blobs/")) == ["blobs/b"]
    assert bucket.get("blobs/a") is None


def test_list_pages_through_more_than_a_thousand_keys(bucket: S3Bucket) -> None:
    keys = [f"many/{n:04d}" for n in range(1005)]
    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(lambda key: bucket.put_if_absent(key, b""), keys))
    assert list(bucket.list("many/")) == keys


def test_presigned_get_serves_whole_and_ranges(bucket: S3Bucket) -> None:
    with bucket.put_stream("blobs/layer") as writer:
        for chunk in chunks(9):
            writer.write(chunk)
        writer.commit()
    data = b"".join(chunks(9))
    url = bucket.presigned_get("blobs/layer", 60)
    assert "X-Amz-Signature=" in url

    whole = httpx.get(url, timeout=30)
    assert whole.status_code == 200
    assert whole.content == data

    # Across the boundary between the two parts.
    first, last = PART_SIZE - 10, PART_SIZE + 9
    ranged = httpx.get(url, headers={"Range": f"bytes={first}-{last}"}, timeout=30)
    assert ranged.status_code == 206
    assert ranged.content == data[first : last + 1]
    assert ranged.headers["Content-Range"] == f"bytes {first}-{last}/{len(data)}"

    tampered = url.replace("blobs/layer", "blobs/other")
    assert httpx.get(tampered, timeout=30).status_code == 403


def test_a_presigned_url_expires(bucket: S3Bucket) -> None:
    assert bucket.put_if_absent("short-lived", b"data")
    url = bucket.presigned_get("short-lived", 1)
    assert httpx.get(url, timeout=30).content == b"data"
    wait_for(lambda: httpx.get(url, timeout=30).status_code == 403, 15, "the URL to expire", 0.2)


def test_failures_of_the_store_are_storage_errors(seaweed: Seaweed, bucket: S3Bucket) -> None:
    no_bucket = S3Bucket(seaweed.endpoint, "no-such-bucket", ACCESS_KEY, SECRET_KEY, REGION)
    with pytest.raises(StorageError, match="NoSuchBucket"):
        no_bucket.get("key")
    with pytest.raises(StorageError, match="NoSuchBucket"):
        list(no_bucket.list(""))
    with pytest.raises(StorageError), no_bucket.put_stream("key") as writer:
        writer.write(b"x" * PART_SIZE)
    wrong_key = S3Bucket(seaweed.endpoint, bucket.bucket, ACCESS_KEY, "not-the-secret", REGION)
    with pytest.raises(StorageError, match="SignatureDoesNotMatch"):
        wrong_key.put_if_absent("key", b"x")
    assert bucket.stat("key") is None
