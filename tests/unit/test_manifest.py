"""Config and manifest building: exact structure, canonical bytes, stable digests."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nixery_trio.core.digest import sha256_digest
from nixery_trio.core.errors import DigestInvalid
from nixery_trio.core.image import Arch
from nixery_trio.core.manifest import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Format,
    LayerBlob,
    acceptable,
    build_config,
    build_index,
    build_manifest,
    canonical_json,
    closure,
    command,
    convert_manifest,
    index_formats,
    manifest_format,
    manifest_refs,
    negotiate,
    parse_document,
)

LAYERS = (
    LayerBlob(digest=sha256_digest(b"gz-1"), diff_id=sha256_digest(b"tar-1"), size=101),
    LayerBlob(digest=sha256_digest(b"gz-2"), diff_id=sha256_digest(b"tar-2"), size=202),
    LayerBlob(digest=sha256_digest(b"gz-3"), diff_id=sha256_digest(b"tar-3"), size=303),
)


def test_config_structure() -> None:
    history = ["nix store paths: /nix/store/a-x", "nix store paths: /nix/store/b-y", "root"]
    config = json.loads(
        build_config(
            arch=Arch.ARM64, layers=LAYERS, cmd=["bash"], user="65532:65532", history=history
        )
    )
    assert config == {
        "architecture": "arm64",
        "variant": "v8",
        "os": "linux",
        "created": "1970-01-01T00:00:01Z",
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in LAYERS]},
        "config": {
            "Env": ["SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt", "PATH=/bin:/usr/bin"],
            "Cmd": ["bash"],
            "User": "65532:65532",
        },
        "history": [{"created": "1970-01-01T00:00:01Z", "created_by": text} for text in history],
    }
    with pytest.raises(ValueError, match="history"):
        build_config(arch=Arch.ARM64, layers=LAYERS, history=history[:2])


def test_config_without_a_command_or_user_has_none() -> None:
    config = json.loads(build_config(arch=Arch.AMD64, layers=LAYERS))
    assert config["architecture"] == "amd64"
    assert "Cmd" not in config["config"] and "User" not in config["config"]
    assert "history" not in config
    assert config["config"]["Env"][0] == "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"


@pytest.mark.parametrize(
    ("requested", "programs", "has_bash", "cmd"),
    [
        (("hello",), {"hello": "hello"}, False, ["/bin/hello"]),
        (("hello",), {"hello": "hello"}, True, ["bash"]),  # shell/hello: a shell
        (("tools.greet",), {"tools.greet": "greet"}, False, ["/bin/greet"]),
        (("docs",), {}, False, None),
        (("docs",), {}, True, ["bash"]),
        (("docs", "hello"), {"hello": "hello"}, False, None),  # two packages: no guess
        (("docs", "hello"), {"hello": "hello"}, True, ["bash"]),
        ((), {}, False, None),
    ],
)
def test_the_command(
    requested: tuple[str, ...], programs: dict[str, str], has_bash: bool, cmd: list[str] | None
) -> None:
    assert command(requested, programs, has_bash) == cmd


def test_manifest_structure() -> None:
    config = build_config(arch=Arch.AMD64, layers=LAYERS)
    config_digest = sha256_digest(config)
    manifest = json.loads(
        build_manifest(config_digest=config_digest, config_size=len(config), layers=LAYERS)
    )
    assert manifest == {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "size": len(config), "digest": config_digest},
        "layers": [
            {"mediaType": DOCKER_LAYER_GZIP, "size": 101, "digest": LAYERS[0].digest},
            {"mediaType": DOCKER_LAYER_GZIP, "size": 202, "digest": LAYERS[1].digest},
            {"mediaType": DOCKER_LAYER_GZIP, "size": 303, "digest": LAYERS[2].digest},
        ],
    }


def test_golden_bytes_and_digests() -> None:
    """Byte-for-byte: a change here changes every image digest we have ever served."""
    config = build_config(arch=Arch.AMD64, layers=LAYERS[:1], cmd=["bash"])
    assert config == (
        b'{"architecture":"amd64","config":{"Cmd":["bash"],"Env":'
        b'["SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt","PATH=/bin:/usr/bin"]},'
        b'"created":"1970-01-01T00:00:01Z",'
        b'"os":"linux","rootfs":{"diff_ids":["' + LAYERS[0].diff_id.encode() + b'"],'
        b'"type":"layers"}}'
    )
    manifest = build_manifest(
        config_digest=sha256_digest(config), config_size=len(config), layers=LAYERS[:1]
    )
    assert manifest == (
        b'{"config":{"digest":"' + sha256_digest(config).encode() + b'",'
        b'"mediaType":"application/vnd.docker.container.image.v1+json","size":'
        + str(len(config)).encode()
        + b'},"layers":[{"digest":"'
        + LAYERS[0].digest.encode()
        + b'","mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":101}],'
        b'"mediaType":"application/vnd.docker.distribution.manifest.v2+json","schemaVersion":2}'
    )
    assert sha256_digest(config) == (
        "sha256:277ab29a23a73c613693cb751eb6d4c395fef5c5ef47bcbb3f3f8ad723b867a0"
    )
    assert sha256_digest(manifest) == (
        "sha256:8f9ac60450f92f294e67bbfa15f7bf89ff33662ff4c5d4ca7baa44fe2532992e"
    )


def test_same_input_same_bytes() -> None:
    first = build_config(arch=Arch.AMD64, layers=LAYERS, cmd=["bash"])
    second = build_config(arch=Arch.AMD64, layers=list(LAYERS), cmd=["bash"])
    assert first == second
    assert build_manifest(config_digest=sha256_digest(first), config_size=1, layers=LAYERS) == (
        build_manifest(config_digest=sha256_digest(second), config_size=1, layers=list(LAYERS))
    )


def test_layer_order_is_preserved_in_both_documents() -> None:
    reordered = (LAYERS[2], LAYERS[0], LAYERS[1])
    config = json.loads(build_config(arch=Arch.AMD64, layers=reordered))
    assert config["rootfs"]["diff_ids"] == [layer.diff_id for layer in reordered]
    manifest = json.loads(
        build_manifest(config_digest=LAYERS[0].digest, config_size=5, layers=reordered)
    )
    assert [entry["digest"] for entry in manifest["layers"]] == [
        layer.digest for layer in reordered
    ]


digests = st.binary(max_size=8).map(sha256_digest)
layer_blobs = st.builds(LayerBlob, digest=digests, diff_id=digests, size=st.integers(0, 2**40))


@given(st.lists(layer_blobs, max_size=20), st.sampled_from(Arch), st.booleans())
def test_json_round_trip(layers: list[LayerBlob], arch: Arch, has_bash: bool) -> None:
    config = build_config(arch=arch, layers=layers, cmd=["bash"] if has_bash else None)
    decoded = json.loads(config)
    assert canonical_json(decoded) == config
    assert decoded["rootfs"]["diff_ids"] == [layer.diff_id for layer in layers]
    assert ("Cmd" in decoded["config"]) is has_bash

    manifest = build_manifest(
        config_digest=sha256_digest(config), config_size=len(config), layers=layers
    )
    decoded_manifest = json.loads(manifest)
    assert canonical_json(decoded_manifest) == manifest
    assert [
        LayerBlob(digest=entry["digest"], diff_id=layer.diff_id, size=entry["size"])
        for entry, layer in zip(decoded_manifest["layers"], layers, strict=True)
    ] == layers


def test_bytes_are_ascii_and_compact() -> None:
    config = build_config(arch=Arch.AMD64, layers=LAYERS, cmd=["bash"])
    config.decode("ascii")
    assert b" " not in config.replace(b"SSL_CERT_FILE", b"")
    assert b"\n" not in config


@pytest.mark.parametrize(
    "field", [{"digest": "sha256:abc"}, {"diff_id": "md5:" + "0" * 32}, {"digest": "A" * 64}]
)
def test_layer_blob_rejects_bad_digests(field: dict[str, str]) -> None:
    values: dict[str, str] = {"digest": LAYERS[0].digest, "diff_id": LAYERS[0].diff_id} | field
    with pytest.raises(DigestInvalid):
        LayerBlob(digest=values["digest"], diff_id=values["diff_id"], size=1)


def test_negative_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="negative"):
        LayerBlob(digest=LAYERS[0].digest, diff_id=LAYERS[0].diff_id, size=-1)
    with pytest.raises(ValueError, match="negative"):
        build_manifest(config_digest=LAYERS[0].digest, config_size=-1, layers=LAYERS)


def test_manifest_rejects_bad_config_digest() -> None:
    with pytest.raises(DigestInvalid):
        build_manifest(config_digest="sha256:nope", config_size=1, layers=LAYERS)


def test_the_oci_manifest_names_the_same_blobs_with_oci_types() -> None:
    config = build_config(arch=Arch.AMD64, layers=LAYERS)
    kwargs = {"config_digest": sha256_digest(config), "config_size": len(config), "layers": LAYERS}
    docker = build_manifest(**kwargs)  # type: ignore[arg-type]
    oci = build_manifest(**kwargs, fmt=Format.OCI)  # type: ignore[arg-type]
    assert json.loads(oci) == {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "size": len(config), "digest": kwargs["config_digest"]},
        "layers": [
            {"mediaType": OCI_LAYER_GZIP, "size": layer.size, "digest": layer.digest}
            for layer in LAYERS
        ],
    }
    assert manifest_refs(oci) == manifest_refs(docker) is not None
    assert (manifest_format(oci), manifest_format(docker)) == (Format.OCI, Format.DOCKER)
    assert convert_manifest(docker, Format.OCI) == oci
    assert convert_manifest(oci, Format.DOCKER) == docker
    assert convert_manifest(b'{"mediaType": "text/plain"}', Format.OCI) is None


DOCKER_AND_OCI = f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, Format.DOCKER),  # no Accept: Docker's, as distribution's clients expect
        ("", Format.DOCKER),
        ("*/*", Format.DOCKER),
        ("application/*", Format.DOCKER),
        (DOCKER_MANIFEST, Format.DOCKER),
        (OCI_MANIFEST, Format.OCI),
        (DOCKER_AND_OCI, Format.OCI),  # both, in either order: OCI
        (f"{OCI_MANIFEST}, {DOCKER_MANIFEST}", Format.OCI),
        (f"{DOCKER_MANIFEST}, {OCI_MANIFEST};q=0.5", Format.DOCKER),  # weights decide
        (f"{DOCKER_MANIFEST};q=0.4, {OCI_MANIFEST};q=0.5", Format.OCI),
        (f"{OCI_MANIFEST};q=0", Format.DOCKER),
        (f"{OCI_MANIFEST};q=0.3, */*", Format.DOCKER),
        (f"{OCI_MANIFEST.upper()} ; q=1.0", Format.OCI),
        (f"{OCI_MANIFEST};q=nonsense, {DOCKER_MANIFEST}", Format.DOCKER),
        # What the clients send: containerd, containers/image (podman, skopeo), Docker.
        (f"{DOCKER_MANIFEST}, application/vnd.docker.distribution.manifest.list.v2+json, "
         f"{OCI_MANIFEST}, application/vnd.oci.image.index.v1+json, */*", Format.OCI),
    ],
)  # fmt: skip
def test_negotiation(accept: str | None, expected: Format) -> None:
    assert negotiate(accept) is expected


def test_acceptable_by_name_or_wildcard() -> None:
    assert acceptable(None, OCI_MANIFEST) and acceptable("*/*", OCI_MANIFEST)
    assert acceptable(DOCKER_AND_OCI, OCI_MANIFEST)
    assert not acceptable(DOCKER_MANIFEST, OCI_MANIFEST)
    assert not acceptable(f"{OCI_MANIFEST};q=0, {DOCKER_MANIFEST}", OCI_MANIFEST)
    assert acceptable("application/*;q=0.1", DOCKER_MANIFEST)


@given(st.text(max_size=200))
def test_negotiation_takes_any_header(accept: str) -> None:
    assert negotiate(accept) in Format


OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, ()),
        ("*/*", ()),  # a list only for a client that names one
        (f"{OCI_MANIFEST}, {DOCKER_MANIFEST}", ()),
        (OCI_INDEX, (Format.OCI,)),
        (DOCKER_LIST, (Format.DOCKER,)),
        (f"{DOCKER_LIST}, {OCI_INDEX}", (Format.OCI, Format.DOCKER)),
        (f"{OCI_INDEX};q=0.5, {DOCKER_LIST}", (Format.DOCKER, Format.OCI)),
        (f"{OCI_INDEX};q=0, {DOCKER_LIST}", (Format.DOCKER,)),
    ],
)
def test_index_negotiation(accept: str | None, expected: tuple[Format, ...]) -> None:
    assert index_formats(accept) == expected


def test_indexes_name_each_platform_manifest() -> None:
    manifests = {
        arch: build_manifest(config_digest=sha256_digest(arch.value.encode()), config_size=9,
                             layers=LAYERS, fmt=Format.OCI)
        for arch in Arch
    }  # fmt: skip

    class Doc:
        def __init__(self, data: bytes) -> None:
            self.digest, self.size = sha256_digest(data), len(data)

    for fmt, media_type in ((Format.OCI, OCI_INDEX), (Format.DOCKER, DOCKER_LIST)):
        data = build_index(fmt, [(Doc(manifests[arch]), arch) for arch in Arch])
        document = json.loads(data)
        assert document == {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [
                {"mediaType": fmt.manifest_type, "digest": sha256_digest(manifests[Arch.AMD64]),
                 "size": len(manifests[Arch.AMD64]),
                 "platform": {"architecture": "amd64", "os": "linux"}},
                {"mediaType": fmt.manifest_type, "digest": sha256_digest(manifests[Arch.ARM64]),
                 "size": len(manifests[Arch.ARM64]),
                 "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
            ],
        }  # fmt: skip
        assert data == canonical_json(document)
        parsed = parse_document(data)
        assert parsed is not None and parsed.media_type == media_type and parsed.is_index
        assert manifest_format(data) is None
        refs = manifest_refs(data)
        assert refs is not None
        assert [(r.digest, r.size) for r in refs] == [
            (sha256_digest(manifests[a]), len(manifests[a])) for a in Arch
        ]
        assert convert_manifest(data, Format.DOCKER) is None
    parsed = parse_document(manifests[Arch.AMD64])
    assert parsed is not None and parsed.media_type == OCI_MANIFEST and not parsed.is_index
    assert parse_document(b"[]") is None and parse_document(b"nonsense") is None


def test_zstd_layers_only_in_oci_manifests() -> None:
    config = sha256_digest(b"config")
    data = build_manifest(config_digest=config, config_size=6, layers=LAYERS, fmt=Format.OCI,
                          compression="zstd")  # fmt: skip
    document = json.loads(data)
    assert {layer["mediaType"] for layer in document["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar+zstd"
    }
    assert manifest_format(data) is Format.OCI
    # Docker's format has no zstd type: no such manifest, and no conversion.
    with pytest.raises(ValueError, match="cannot hold zstd"):
        build_manifest(config_digest=config, config_size=6, layers=LAYERS, fmt=Format.DOCKER,
                       compression="zstd")  # fmt: skip
    assert convert_manifest(data, Format.DOCKER) is None


def test_closure_follows_indexes_to_every_blob() -> None:
    config = b'{"c":1}'
    manifest = build_manifest(config_digest=sha256_digest(config), config_size=len(config),
                              layers=LAYERS, fmt=Format.OCI)  # fmt: skip

    class Doc:
        digest, size = sha256_digest(manifest), len(manifest)

    index = build_index(Format.OCI, [(Doc(), Arch.ARM64)])
    store = {sha256_digest(d): d for d in (index, manifest, config)}
    found = closure([sha256_digest(index)], store.get)
    assert found.documents == [sha256_digest(index), sha256_digest(manifest)]
    assert found.blobs == {
        sha256_digest(index): len(index), sha256_digest(manifest): len(manifest),
        sha256_digest(config): len(config), **{layer.digest: layer.size for layer in LAYERS},
    }  # fmt: skip
    del store[sha256_digest(manifest)]
    with pytest.raises(LookupError, match=sha256_digest(manifest)):
        closure([sha256_digest(index)], store.get)
    store[sha256_digest(manifest)] = manifest + b" "  # not the size the index names
    with pytest.raises(ValueError, match="its index says"):
        closure([sha256_digest(index)], store.get)
    with pytest.raises(ValueError, match="no manifest or index"):
        closure([sha256_digest(config)], store.get)
