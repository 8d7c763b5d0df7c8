"""A package set in a local git repository: the image tag is the git ref."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .server import DEMO, Server, start_server

DOC = Path("files/docs/share/doc/nixery-demo/README")


def git(repo: Path, *argv: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *argv],
        check=True,
        capture_output=True,
        text=True,
        env={
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@example.invalid",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.invalid",
            "PATH": "/usr/bin:/bin",
            "HOME": str(repo),
        },
    ).stdout.strip()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """main: the demo set; tag v1 at main; branch feature with another README."""
    repo = tmp_path_factory.mktemp("pkgs-repo")
    shutil.copytree(DEMO, repo, dirs_exist_ok=True)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "demo")
    git(repo, "tag", "v1")
    git(repo, "checkout", "-q", "-b", "feature")
    (repo / DOC).write_text("the feature branch\n")
    git(repo, "commit", "-q", "-am", "feature")
    git(repo, "checkout", "-q", "main")
    return repo


@pytest.fixture(scope="module")
def git_server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(
        tmp_path_factory.mktemp("git-registry"), source=("--pkgs-repo", f"file://{repo}")
    )
    yield server
    server.stop()


def manifest(server: Server, name: str, tag: str) -> httpx.Response:
    response = httpx.get(f"{server.url}/v2/{name}/manifests/{tag}", timeout=120)
    assert response.status_code == 200, response.text
    return response


def docs_layer_digests(server: Server, tag: str) -> set[str]:
    return {layer["digest"] for layer in manifest(server, "docs", tag).json()["layers"]}


def test_branch_tag_and_commit_as_image_tags(git_server: Server, repo: Path) -> None:
    main_commit = git(repo, "rev-parse", "main")
    feature_commit = git(repo, "rev-parse", "feature")
    latest = docs_layer_digests(git_server, "latest")
    assert docs_layer_digests(git_server, "main") == latest
    assert docs_layer_digests(git_server, "v1") == latest
    assert docs_layer_digests(git_server, main_commit) == latest
    feature = docs_layer_digests(git_server, "feature")
    assert feature != latest
    assert docs_layer_digests(git_server, feature_commit) == feature


def test_commits_are_cached_and_branches_rebuilt(git_server: Server, repo: Path) -> None:
    commit = git(repo, "rev-parse", "main")
    first = manifest(git_server, "hello", commit).content
    nix_builds = git_server.count("nix.build")
    layers_built = git_server.count("layer.built")
    assert manifest(git_server, "hello", commit).content == first
    assert git_server.count("nix.build") == nix_builds  # a commit is immutable

    # A branch may move, so Nix runs again, but every layer is cached.
    assert manifest(git_server, "hello", "main").content == first
    assert git_server.count("nix.build") == nix_builds + 1
    assert git_server.count("layer.built") == layers_built


def test_the_tags_are_the_repositorys_branches_and_tags(git_server: Server, repo: Path) -> None:
    tags = httpx.get(f"{git_server.url}/v2/shell/hello/tags/list", timeout=60).json()
    assert tags == {"name": "shell/hello", "tags": ["feature", "latest", "main", "v1"]}
    # A new tag is served at once, by every worker, not after the list's 30 s:
    # a tag not in the list has the repository asked again (if no listing of
    # the last 2 s said it has no such tag).
    git(repo, "tag", "v2")
    try:
        for _ in range(4):  # both workers, whichever gets each request
            assert docs_layer_digests(git_server, "v2") == docs_layer_digests(git_server, "latest")
    finally:
        git(repo, "tag", "-d", "v2")


def test_unknown_ref_is_an_unknown_manifest(git_server: Server) -> None:
    nix_builds = git_server.count("nix.build")
    response = httpx.get(f"{git_server.url}/v2/hello/manifests/no-such-branch", timeout=120)
    assert response.status_code == 404
    error = response.json()["errors"][0]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert {"feature", "latest", "main", "v1"} <= set(error["detail"]["tags"])
    assert git_server.count("nix.build") == nix_builds  # Nix is not asked
