"""The registry API over real HTTP, against a server building with real Nix."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
from pathlib import Path

import httpx
import pytest

from ..pagecache_truth import cached_pages, evict
from .server import Server, start_server, wait_for

MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def get(server: Server, path: str, method: str = "GET", **kwargs: object) -> httpx.Response:
    return httpx.request(method, server.url + path, timeout=120, **kwargs)  # type: ignore[arg-type]


def raw_get(server: Server, path: str, method: str = "GET") -> httpx.Response:
    """A request with the path sent byte for byte (httpx would normalise it)."""
    host, port = server.host.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        connection.request(method, path)
        reply = connection.getresponse()
        return httpx.Response(reply.status, headers=reply.getheaders(), content=reply.read())
    finally:
        connection.close()


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    errors = response.json()["errors"]
    assert len(errors) == 1
    assert errors[0]["code"] == code
    assert errors[0]["message"]
    return errors[0]


def test_version_check(server: Server) -> None:
    response = get(server, "/v2/")
    assert response.status_code == 200
    assert response.headers["docker-distribution-api-version"] == "registry/2.0"


def test_every_status_line_has_its_reason_phrase(server: Server) -> None:
    layer = max(get(server, "/v2/hello/manifests/latest").json()["layers"], key=len)
    blob = f"/v2/hello/blobs/{layer['digest']}"
    host, port = server.host.rsplit(":", 1)
    for method, path, headers, status, reason in [
        ("GET", "/v2/", {}, 200, "OK"),
        ("GET", "/v2/hello/manifests/latest", {}, 200, "OK"),
        ("HEAD", blob, {}, 200, "OK"),
        ("GET", blob, {"Range": "bytes=0-9"}, 206, "Partial Content"),
        ("GET", blob, {"Range": "bytes=999999999-"}, 416, "Range Not Satisfiable"),
        ("GET", "/nope", {}, 404, "Not Found"),
        ("PUT", "/v2/hello/manifests/latest", {}, 405, "Method Not Allowed"),
        ("GET", "/v2/UPPER/manifests/latest", {}, 400, "Bad Request"),
    ]:
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            connection.request(method, path, headers=headers)
            reply = connection.getresponse()
            reply.read()
        finally:
            connection.close()
        assert (reply.status, reply.reason) == (status, reason), path


def test_v2_without_its_slash_is_answered_not_redirected(server: Server) -> None:
    """A redirect would carry the client's Host header into its Location."""
    response = get(server, "/v2", headers={"Host": "evil.example"})
    assert response.status_code == 200 and response.json() == {}
    assert "location" not in response.headers
    assert response.headers["docker-distribution-api-version"] == "registry/2.0"


def test_manifest_config_and_blobs(server: Server) -> None:
    response = get(server, "/v2/hello/manifests/latest")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == MANIFEST
    digest = "sha256:" + hashlib.sha256(response.content).hexdigest()
    assert response.headers["docker-content-digest"] == digest
    manifest = response.json()
    assert manifest["mediaType"] == MANIFEST and manifest["schemaVersion"] == 2

    head = get(server, "/v2/hello/manifests/latest", "HEAD")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["docker-content-digest"] == digest
    assert int(head.headers["content-length"]) == len(response.content)

    by_digest = get(server, f"/v2/hello/manifests/{digest}")
    assert by_digest.content == response.content

    config = get(server, f"/v2/hello/blobs/{manifest['config']['digest']}").json()
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    assert len(config["rootfs"]["diff_ids"]) == len(manifest["layers"])
    assert "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt" in config["config"]["Env"]
    assert config["config"]["Cmd"] == ["/bin/hello"]  # hello's meta.mainProgram
    assert "User" not in config["config"]

    for layer in manifest["layers"]:
        blob = get(server, f"/v2/hello/blobs/{layer['digest']}")
        assert blob.status_code == 200
        assert len(blob.content) == layer["size"]
        assert "sha256:" + hashlib.sha256(blob.content).hexdigest() == layer["digest"]
        assert blob.headers["docker-content-digest"] == layer["digest"]
        head = get(server, f"/v2/hello/blobs/{layer['digest']}", "HEAD")
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) == layer["size"]


def test_an_output_named_or_not_is_one_image(server: Server) -> None:
    """``hello.out`` is ``hello``'s default output: Nix runs once for each
    spelling (only Nix knows a package's default output, and for a package
    whose first output is ``bin``, ``pkg.out`` is another image), and both
    give the same manifest, stored once."""
    plain = get(server, "/v2/hello/manifests/latest", headers={"Accept": MANIFEST})
    dotted = get(server, "/v2/hello.out/manifests/latest", headers={"Accept": MANIFEST})
    assert plain.status_code == dotted.status_code == 200
    assert plain.content == dotted.content


OCI = "application/vnd.oci.image.manifest.v1+json"


def test_a_tag_answers_in_the_format_the_client_prefers(server: Server) -> None:
    path = "/v2/shell/hello/manifests/latest"
    answers = {}
    for accept in (None, "*/*", MANIFEST, OCI, f"{MANIFEST}, {OCI}", f"{OCI};q=0.2, {MANIFEST}"):
        headers = {} if accept is None else {"Accept": accept}
        response = get(server, path, headers=headers)
        assert response.status_code == 200, response.text
        digest = "sha256:" + hashlib.sha256(response.content).hexdigest()
        assert response.headers["docker-content-digest"] == digest
        assert response.headers["content-type"] == response.json()["mediaType"]
        assert "Accept" in response.headers["vary"]
        head = get(server, path, "HEAD", headers=headers)
        assert head.headers["docker-content-digest"] == digest
        answers[accept] = response
    types = {accept: r.headers["content-type"] for accept, r in answers.items()}
    assert types == {None: MANIFEST, "*/*": MANIFEST, MANIFEST: MANIFEST, OCI: OCI,
                     f"{MANIFEST}, {OCI}": OCI, f"{OCI};q=0.2, {MANIFEST}": MANIFEST}  # fmt: skip
    docker, oci = answers[MANIFEST].json(), answers[OCI].json()
    assert oci["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert {layer["mediaType"] for layer in oci["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar+gzip"
    }
    # The same config and layer blobs, in both formats.
    assert oci["config"]["digest"] == docker["config"]["digest"]
    assert [layer["digest"] for layer in oci["layers"]] == [
        layer["digest"] for layer in docker["layers"]
    ]
    # Each is stored under its own digest, and served by it.
    for response, media_type in ((answers[MANIFEST], MANIFEST), (answers[OCI], OCI)):
        digest = response.headers["docker-content-digest"]
        by_digest = get(server, f"/v2/shell/hello/manifests/{digest}")
        assert by_digest.content == response.content
        assert by_digest.headers["content-type"] == media_type
    # By digest, a client that does not take the stored type is told so.
    oci_digest = answers[OCI].headers["docker-content-digest"]
    refused = get(server, f"/v2/shell/hello/manifests/{oci_digest}", headers={"Accept": MANIFEST})
    assert_error(refused, 404, "MANIFEST_UNKNOWN")


def test_a_path_source_serves_latest_only(server: Server) -> None:
    latest = get(server, "/v2/hello/manifests/latest")
    assert latest.status_code == 200
    for tag in ("anytypo", "v1", "0" * 40):
        response = get(server, f"/v2/hello/manifests/{tag}")
        error = assert_error(response, 404, "MANIFEST_UNKNOWN")
        assert "serves latest" in error["message"], error
        assert error["detail"] == {"tag": tag, "tags": ["latest"]}
    for tag in (".bad", "-x"):  # not a tag at all
        assert_error(get(server, f"/v2/hello/manifests/{tag}"), 404, "MANIFEST_UNKNOWN")


def test_settings_restore_nixerys_tags_and_manifests(tmp_path: Path) -> None:
    extra = ("--any-tag", "1", "--oci", "0", "--workers", "1")
    with start_server(tmp_path, extra=extra) as server:
        latest = get(server, "/v2/hello/manifests/latest")
        assert get(server, "/v2/hello/manifests/anytypo").content == latest.content
        assert get(server, "/v2/hello/tags/list").json()["tags"] == ["latest"]
        oci_asked = get(server, "/v2/hello/manifests/latest", headers={"Accept": OCI})
        assert oci_asked.headers["content-type"] == MANIFEST


def test_catalog_lists_the_images_built_by_pages(tmp_path: Path) -> None:
    names = ["chain-a", "hello", "shell/hello"]
    with start_server(tmp_path, extra=("--workers", "1")) as server:
        assert get(server, "/v2/_catalog").json() == {"repositories": []}
        for name in names:
            assert get(server, f"/v2/{name}/manifests/latest").status_code == 200
        assert wait_for(lambda: get(server, "/v2/_catalog").json()["repositories"] == names,
                        30, "the catalog to list them")  # fmt: skip
        pages, url = [], "/v2/_catalog?n=2"
        while url:
            response = get(server, url)
            assert response.status_code == 200
            pages.append(response.json()["repositories"])
            link = response.headers.get("link")
            url = link.split(">", 1)[0].removeprefix("<") if link else ""
            assert not link or link.endswith('; rel="next"')
        assert pages == [["chain-a", "hello"], ["shell/hello"]]
        assert get(server, "/v2/_catalog?n=1&last=hello").json() == {
            "repositories": ["shell/hello"]
        }
        assert_error(get(server, "/v2/_catalog?n=lots"), 400, "PAGINATION_NUMBER_INVALID")


def test_tags_list_pages(server: Server) -> None:
    assert get(server, "/v2/hello/tags/list?n=0").json() == {"name": "hello", "tags": []}
    one = get(server, "/v2/hello/tags/list?n=1")
    assert one.json() == {"name": "hello", "tags": ["latest"]} and "link" not in one.headers
    assert get(server, "/v2/hello/tags/list?last=latest").json()["tags"] == []
    assert_error(get(server, "/v2/hello/tags/list?n=-1"), 400, "PAGINATION_NUMBER_INVALID")


def test_referrers_are_an_empty_index(server: Server) -> None:
    digest = get(server, "/v2/hello/manifests/latest").headers["docker-content-digest"]
    for query, filtered in (("", False), ("?artifactType=application/spdx%2Bjson", True)):
        response = get(server, f"/v2/hello/referrers/{digest}{query}")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/vnd.oci.image.index.v1+json"
        assert response.json() == {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [],
        }
        assert ("oci-filters-applied" in response.headers) is filtered
    assert_error(get(server, "/v2/hello/referrers/latest"), 400, "DIGEST_INVALID")


def config_of(server: Server, name: str) -> dict:
    manifest = get(server, f"/v2/{name}/manifests/latest").json()
    config: dict = get(server, f"/v2/{name}/blobs/{manifest['config']['digest']}").json()
    config["_layers"] = len(manifest["layers"])
    return config


def test_configs_say_when_what_and_who(server: Server) -> None:
    hello = config_of(server, "hello")
    assert hello["created"] == "1970-01-01T00:00:01Z"  # fixed: digests stay reproducible
    history = hello["history"]
    assert len(history) == hello["_layers"]
    assert all(entry["created"] == hello["created"] for entry in history)
    assert any("-hello" in entry["created_by"] for entry in history[:-1])
    assert history[-1]["created_by"].startswith("image root: links from /nix/store/")
    assert config_of(server, "shell/hello")["config"]["Cmd"] == ["bash"]
    assert "Cmd" not in config_of(server, "docs")["config"]
    nonroot = config_of(server, "nonroot/hello")
    assert nonroot["config"]["User"] == "65532:65532"
    assert nonroot["config"]["Cmd"] == ["/bin/hello"]


def test_tags_list(server: Server) -> None:
    assert get(server, "/v2/shell/hello/tags/list").json() == {
        "name": "shell/hello",
        "tags": ["latest"],
    }


def test_blobs_not_in_the_page_cache_are_served_whole(server: Server) -> None:
    manifest = get(server, "/v2/shell/manifests/latest", headers={"Accept": MANIFEST}).json()
    layer = max(manifest["layers"], key=lambda entry: entry["size"])
    path = server.storage / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")
    for headers, first in (({}, 0), ({"Range": "bytes=5000-"}, 5000)):
        fd = os.open(path, os.O_RDONLY)
        try:
            evict(fd)
            response = get(server, f"/v2/shell/blobs/{layer['digest']}", headers=headers)
            assert all(cached_pages(fd, first)), "the server read the blob in"
        finally:
            os.close(fd)
        whole = path.read_bytes()
        assert response.content == whole[first:]
    assert "sha256:" + hashlib.sha256(whole).hexdigest() == layer["digest"]


def test_range_requests(server: Server) -> None:
    manifest = get(server, "/v2/hello/manifests/latest").json()
    layer = max(manifest["layers"], key=lambda entry: entry["size"])
    path = f"/v2/hello/blobs/{layer['digest']}"
    whole = get(server, path).content
    part = get(server, path, headers={"Range": "bytes=10-99"})
    assert part.status_code == 206
    assert part.content == whole[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{len(whole)}"
    tail = get(server, path, headers={"Range": "bytes=-7"})
    assert tail.status_code == 206 and tail.content == whole[-7:]
    past = get(server, path, headers={"Range": f"bytes={len(whole)}-"})
    assert_error(past, 416, "RANGE_INVALID")
    assert past.headers["content-range"] == f"bytes */{len(whole)}"
    assert_error(get(server, path, headers={"Range": "bytes=9-2"}), 416, "RANGE_INVALID")


def test_blobs_by_sendfile_and_by_reads_are_identical(
    server: Server, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The sendfile path (the default) and Quart's reads answer byte for byte alike."""
    reads = start_server(tmp_path_factory.mktemp("reads"), extra=["--blob-sendfile", "0"])
    try:
        manifest = get(server, "/v2/hello/manifests/latest").json()
        assert get(reads, "/v2/hello/manifests/latest").json() == manifest
        layer = max(manifest["layers"], key=lambda entry: entry["size"])
        for blob in (layer, manifest["config"]):
            path = f"/v2/hello/blobs/{blob['digest']}"
            for method, headers in (("GET", {}), ("HEAD", {}), ("GET", {"Range": "bytes=3-"})):
                answers = [get(s, path, method, headers=headers) for s in (server, reads)]
                seen = [({k: v for k, v in r.headers.items() if k != "date"}, r.status_code,
                         r.content) for r in answers]  # fmt: skip
                assert seen[0] == seen[1]
            whole = get(server, path).content
            assert "sha256:" + hashlib.sha256(whole).hexdigest() == blob["digest"]
    finally:
        reads.stop()


def test_shell_image_has_bash_cmd(server: Server) -> None:
    manifest = get(server, "/v2/shell/hello/manifests/latest").json()
    config = get(server, f"/v2/shell/hello/blobs/{manifest['config']['digest']}").json()
    assert config["config"]["Cmd"] == ["bash"]


def test_shared_packages_share_layer_digests(server: Server) -> None:
    left = get(server, "/v2/diamond-left/manifests/latest").json()
    right = get(server, "/v2/diamond-right/manifests/latest").json()
    shared = {entry["digest"] for entry in left["layers"]} & {
        entry["digest"] for entry in right["layers"]
    }
    assert shared, "images sharing packages must share layers"


def test_cached_image_runs_no_nix_and_builds_no_layer(server: Server) -> None:
    first = get(server, "/v2/chain-a/manifests/latest")
    assert first.status_code == 200
    nix_builds, layer_builds = server.count("nix.build"), server.count("layer.built")
    again = get(server, "/v2/chain-a/manifests/latest")
    assert again.content == first.content
    assert server.count("nix.build") == nix_builds
    assert server.count("layer.built") == layer_builds
    assert server.count("manifest.cached") >= 1


def test_package_order_does_not_matter(server: Server) -> None:
    one = get(server, "/v2/hello/chain-c/manifests/latest")
    two = get(server, "/v2/chain-c/hello/manifests/latest")
    assert one.status_code == 200
    assert one.content == two.content


def test_missing_packages_are_named(server: Server) -> None:
    response = get(server, "/v2/hello/nope-one/nope-two/manifests/latest")
    error = assert_error(response, 404, "MANIFEST_UNKNOWN")
    assert "nope-one" in error["message"] and "nope-two" in error["message"]
    assert sorted(error["detail"]["missing"]) == ["nope-one", "nope-two"]


def test_errors_of_the_fast_lane_look_like_quarts(server: Server) -> None:
    """A manifest error (answered before Quart) and a blob error (by Quart) alike."""
    lane = get(server, "/v2/hello/nope-one/manifests/latest")
    quart = get(server, "/v2/hello/blobs/sha256:" + "0" * 64)
    assert_error(lane, 404, "MANIFEST_UNKNOWN")
    assert_error(quart, 404, "BLOB_UNKNOWN")
    for response in (lane, quart):
        assert response.headers["content-length"] == str(len(response.content))
        assert response.headers["docker-distribution-api-version"] == "registry/2.0"
        assert response.headers["server"].startswith("nixery-trio/")
    assert sorted(lane.headers) == sorted(quart.headers)


def test_broken_package_says_which_derivation_failed(server: Server) -> None:
    error = assert_error(get(server, "/v2/broken/manifests/latest"), 500, "BUILD_FAILED")
    assert "broken" in error["message"] and ".drv" in error["message"]
    assert get(server, "/v2/").status_code == 200  # still serving


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/Hello/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/hello/../x/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/hello%2fx/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/hello/manifests/bad:tag!", 400, "DIGEST_INVALID"),
        ("/v2/hello/manifests/-bad", 404, "MANIFEST_UNKNOWN"),
        ("/v2/hello/blobs/sha256:abc", 400, "DIGEST_INVALID"),
        ("/v2/hello/blobs/md5:" + "0" * 32, 400, "DIGEST_INVALID"),
        ("/v2/hello/blobs/sha256:" + "A" * 64, 400, "DIGEST_INVALID"),
        ("/v2/hello/blobs/sha256:" + "0" * 64, 404, "BLOB_UNKNOWN"),
        ("/v2/hello/manifests/sha256:" + "0" * 64, 404, "MANIFEST_UNKNOWN"),
        ("/v2/hello/referrers/x", 400, "DIGEST_INVALID"),
        ("/v2/hello/referrer/x", 404, "NOT_FOUND"),
        ("/v2/Hello/tags/list", 400, "NAME_INVALID"),
        ("/elsewhere", 404, "NOT_FOUND"),
    ],
)
def test_bad_requests_get_registry_errors(
    server: Server, path: str, status: int, code: str
) -> None:
    assert_error(raw_get(server, path), status, code)
    assert get(server, "/v2/").status_code == 200


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_other_methods_are_unsupported(server: Server, method: str) -> None:
    response = get(server, "/v2/hello/manifests/latest", method)
    assert_error(response, 405, "UNSUPPORTED")
    assert response.headers["allow"] == "GET, HEAD"


def test_too_many_packages(server: Server) -> None:
    name = "/".join(f"p{i}" for i in range(70))
    error = assert_error(get(server, f"/v2/{name}/manifests/latest"), 400, "NAME_INVALID")
    assert "64" in error["message"]


def test_log_lines_are_json_with_severity(server: Server) -> None:
    lines = server.log_path.read_text().splitlines()
    assert lines
    for line in lines:
        entry = json.loads(line)
        assert entry["severity"] in {"DEBUG", "INFO", "WARNING", "ERROR"}
    started = server.events("server.started")[0]
    assert len(started["version"]) == 16


def test_absurd_headers_are_refused_in_registry_format(server: Server) -> None:
    response = get(server, "/v2/hello/manifests/latest", headers={"X-Big": "a" * 40_000})
    assert_error(response, 431, "HEADERS_TOO_LARGE")
    assert get(server, "/v2/").status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/v2/%2e%2e/manifests/latest",
        "/v2/hello/%2e%2e/%2e%2e/manifests/latest",
        "/v2//etc/passwd/manifests/latest",
        "/v2/hello/blobs/sha256:..%2f..%2fetc",
        "/v2/hello/blobs/sha256%3a" + "0" * 64 + "%2f..",
        "/v2/" + "a" * 256 + "/manifests/latest",
        "/v2/hello%22/manifests/latest",
        "/v2/hello/manifests/latest%00",
    ],
)
def test_traversal_attempts_write_nothing(server: Server, path: str) -> None:
    before = sorted(p.name for p in (server.storage / "blobs" / "sha256").iterdir())
    response = raw_get(server, path)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["errors"][0]["code"] in {"NAME_INVALID", "DIGEST_INVALID",
                                                    "MANIFEST_UNKNOWN", "NOT_FOUND"}  # fmt: skip
    assert sorted(p.name for p in (server.storage / "blobs" / "sha256").iterdir()) == before


@pytest.mark.parametrize("method", ["OPTIONS", "TRACE", "FOO", "PROPFIND"])
def test_odd_methods_are_unsupported(server: Server, method: str) -> None:
    assert_error(raw_get(server, "/v2/hello/manifests/latest", method), 405, "UNSUPPORTED")


@pytest.mark.parametrize("header", ["bytes=0-1,4-5", "bytes=9-2", "bytes=x-y", "chars=0-1"])
def test_bad_ranges(server: Server, header: str) -> None:
    manifest = get(server, "/v2/hello/manifests/latest").json()
    path = f"/v2/hello/blobs/{manifest['layers'][0]['digest']}"
    assert_error(get(server, path, headers={"Range": header}), 416, "RANGE_INVALID")


def test_warm_and_cold_manifest_responses_are_identical(server: Server) -> None:
    """The first answer waits for the build, the next comes from memory."""

    def answer(method: str) -> tuple[dict[str, str], bytes]:
        response = get(server, "/v2/diamond-top/chain-b/manifests/latest", method)
        assert response.status_code == 200
        headers = {k: v for k, v in response.headers.items() if k != "date"}
        return headers, response.content

    cached_before = server.count("manifest.cached")
    cold = answer("GET")
    warm = answer("GET")
    assert warm == cold
    assert answer("HEAD") == (cold[0], b"")
    assert server.count("manifest.cached") == cached_before + 2


@pytest.mark.parametrize("sendfile", ["1", "0"])
def test_a_client_that_stops_reading_a_blob_is_cut_off(tmp_path: Path, sendfile: str) -> None:
    server = start_server(tmp_path, extra=("--send-timeout", "1", "--blob-sendfile", sendfile))
    try:
        manifest = get(server, "/v2/shell/manifests/latest", headers={"Accept": MANIFEST}).json()
        layer = max(manifest["layers"], key=lambda entry: entry["size"])
        host, port = server.host.rsplit(":", 1)
        # A receive window of a few KiB keeps the server's send buffer small,
        # so a blob of a MB stalls as soon as the client stops reading.
        with socket.socket() as stalled:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
            stalled.settimeout(30)
            stalled.connect((host, int(port)))
            request = f"GET /v2/shell/blobs/{layer['digest']} HTTP/1.1\r\nhost: test\r\n\r\n"
            stalled.sendall(request.encode())
            received = len(stalled.recv(100))
            client = f"127.0.0.1:{stalled.getsockname()[1]}"
            wait_for(
                lambda: any(e["client"] == client for e in server.events("client.stalled")),
                30,
                "the server to give up on the stalled client",
            )
            assert get(server, "/v2/").status_code == 200  # and it keeps serving
            while chunk := stalled.recv(1 << 20):
                received += len(chunk)
        assert received < layer["size"]
        [event] = server.events("client.stalled")
        assert event["send_timeout"] == 1
    finally:
        server.stop()
