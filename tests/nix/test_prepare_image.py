"""nix/prepare-image.nix and the demo package set, built with the real Nix.

Builds are shared through session-scoped fixtures: each distinct image is
built once per run, and the demo packages take a fraction of a second each.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

HELLO_IMAGE = ["hello", "cacert", "iana-etc"]
# Lenient names, shared dependencies and a runnable package of every kind.
NAMES_IMAGE = [
    "tools.greet",
    "bashinteractive",
    "camelcase",
    "1password",
    "diamond-top",
    "chain-a",
    "coreutils",
    "moreutils",
    "nano",
]
CROSS_IMAGE = ["docs", "cacert", "iana-etc"]
AARCH64 = "aarch64-linux"
# ELF e_machine values.
EM_X86_64 = 62
EM_AARCH64 = 183

# The host's demo packages as they were before the demo learnt aarch64, for
# Debian 12's busybox-static 1:1.35.0-4+deb12u1+b1 on x86_64. A change here
# changes the layers and digests of every demo image: make it on purpose.
HOST_BUSYBOX = "/nix/store/71fc7s32zl20dc955bhghy5dvalm7ndz-busybox"
HOST_STORE_PATHS = {
    "_1password": "/nix/store/bg9riny6bn2lcbgh2dwf6mh26h0lhjm5-1password",
    "bashInteractive": "/nix/store/1k0iw6i19yf92ybli9p61swdj739qqbn-bash-interactive",
    "broken": "/nix/store/5kjfl26hayjvsgracxb7s1v1wr9fhc3h-broken",
    "busybox": HOST_BUSYBOX,
    "cacert": "/nix/store/gnwz4ld3wgyk1ll3vgsha1fpfjmjayk3-cacert",
    "camelCase": "/nix/store/pdkkqladbf6rjca8cx95470z4ypcz9bw-camel-case",
    "chain-a": "/nix/store/zwa1w556bw4j89s50gyx2d75sqyllp4f-chain-a",
    "chain-b": "/nix/store/izr9zfccm9whaz5law1wlhdiqvx418hg-chain-b",
    "chain-c": "/nix/store/5q83shxrm2zfckd0pyjdn7c6vdb4r51b-chain-c",
    "coreutils": "/nix/store/aj885spxisjyqz6vy4qpyf6jj1vg7ndx-coreutils",
    "diamond-base": "/nix/store/3bv0m403p6fjg3dqd5lzrqxskkrsvwbz-diamond-base",
    "diamond-left": "/nix/store/d7y2k6f3pjsa6dacph5cyqlyfkqg03az-diamond-left",
    "diamond-right": "/nix/store/jkaw0zhr9k5xdwz1k9a7cf5q5p7dnxk1-diamond-right",
    "diamond-top": "/nix/store/di3wnw4chlhdip0xzn2hhnhgg0p33d05-diamond-top",
    "docs": "/nix/store/xaz32xp5p7nz0wg97pnp6bvzi7qzqla1-docs",
    "hang": "/nix/store/6plrb7v1690c9sy5qjs7246rw6ips1n0-hang",
    "hello": "/nix/store/ww84ik5f9s4z3ywhrvmy6w2d74a3787x-hello",
    "iana-etc": "/nix/store/7cccshxr4glz9s81q9v2nzjb43zdj0nd-iana-etc",
    "large": "/nix/store/np5jq44hffl9sh4jg5vkjp9z9gqv1vfr-large",
    "moreutils": "/nix/store/1yx47qgggrq86y04aprhdfjs71jwm3lh-moreutils",
    "nano": "/nix/store/qwmydc7a0f0z5f7brygyiz7q1dljdrlv-nano",
    "slow": "/nix/store/q4p2kc1n73q6h6x4cxgl80hwzabkqkcd-slow",
    "tools.greet": "/nix/store/8l81ii6nja9qnb0fydbqwl1fahzjgizx-greet",
}


def by_path(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["path"]: entry for entry in data["graph"]}


def closure(graph: dict[str, dict[str, Any]], root: str) -> set[str]:
    seen: set[str] = set()
    todo = [root]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(graph[path]["references"])
    return seen


def other_system(system: str) -> str:
    return "aarch64-linux" if system == "x86_64-linux" else "x86_64-linux"


def elf_machine(path: Path) -> int | None:
    """The e_machine field of an ELF file's header, or None when the file is no ELF."""
    with path.open("rb") as file:
        header = file.read(20)
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    byte_order = "<" if header[5] == 1 else ">"  # EI_DATA: 1 little-endian, 2 big
    (machine,) = struct.unpack_from(byte_order + "H", header, 18)
    return int(machine)


def demo_packages_expression(demo_dir: Path, system: str, value: str) -> str:
    """A Nix expression: every package of the demo set for system -> value (of `p`).

    `removed` is left out (it throws) and `tools.greet` stands for `tools`.
    """
    return f"""
        let
          pkgs = import {demo_dir} {{ system = "{system}"; config = {{ }}; overlays = [ ]; }};
          packages = builtins.removeAttrs pkgs [ "removed" "tools" ]
            // {{ "tools.greet" = pkgs.tools.greet; }};
        in
        builtins.mapAttrs (name: p: {value}) packages
    """


@pytest.fixture(scope="session")
def hello_image(nix: Any) -> dict[str, Any]:
    return nix.prepare_demo_image(HELLO_IMAGE).ok  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def names_image(nix: Any) -> dict[str, Any]:
    return nix.prepare_demo_image(NAMES_IMAGE).ok  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def aarch64_hello_image(nix: Any) -> dict[str, Any]:
    return nix.prepare_demo_image(HELLO_IMAGE, system=AARCH64).ok  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def aarch64_names_image(nix: Any) -> dict[str, Any]:
    return nix.prepare_demo_image(NAMES_IMAGE, system=AARCH64).ok  # type: ignore[no-any-return]


# The image's contents


def test_hello_graph_holds_its_closure_with_sizes(nix: Any, hello_image: dict[str, Any]) -> None:
    graph = by_path(hello_image)
    hello = hello_image["roots"]["hello"]
    references = graph[hello]["references"]
    assert [nix.store_name(path) for path in references] == ["busybox"]
    busybox = references[0]
    for entry in graph.values():
        assert entry["narSize"] > 0
        assert entry["closureSize"] >= entry["narSize"]
    assert graph[hello]["closureSize"] == graph[hello]["narSize"] + graph[busybox]["narSize"]
    assert graph[busybox]["narSize"] > 1_000_000


def test_graph_is_the_closure_of_the_roots_and_usr_bin_env(
    nix: Any, hello_image: dict[str, Any]
) -> None:
    graph = by_path(hello_image)
    for entry in graph.values():
        assert set(entry["references"]) <= graph.keys()
    reached: set[str] = set()
    for root in hello_image["roots"].values():
        reached |= closure(graph, root)
    extra = graph.keys() - reached
    assert [nix.store_name(path) for path in extra] == ["usr-bin-env"]
    assert hello_image["forest"] not in graph


def test_roots_map_each_requested_name_to_its_package(
    nix: Any, hello_image: dict[str, Any]
) -> None:
    roots = hello_image["roots"]
    assert {name: nix.store_name(path) for name, path in roots.items()} == {
        "hello": "hello",
        "cacert": "cacert",
        "iana-etc": "iana-etc",
    }
    hello = Path(roots["hello"], "bin", "hello")
    assert hello.read_text().startswith("#!/nix/store/")
    assert os.access(hello, os.X_OK)
    bundle = Path(roots["cacert"], "etc", "ssl", "certs", "ca-bundle.crt").read_text()
    assert bundle.count("-----BEGIN CERTIFICATE-----") > 50
    assert "tcp" in Path(roots["iana-etc"], "etc", "protocols").read_text()
    assert "http" in Path(roots["iana-etc"], "etc", "services").read_text()


def test_forest_links_into_the_graph(hello_image: dict[str, Any]) -> None:
    forest = Path(hello_image["forest"])
    assert os.readlink(forest / "bin") == f"{hello_image['roots']['hello']}/bin"
    assert (forest / "bin" / "hello").is_file()
    assert (forest / "etc" / "ssl" / "certs" / "ca-bundle.crt").is_file()
    assert os.readlink(forest / "usr" / "bin" / "env") == "/bin/env"
    graph_paths = tuple(by_path(hello_image))
    for dirpath, dirnames, filenames in os.walk(forest):
        for name in dirnames + filenames:
            entry = Path(dirpath, name)
            if entry.is_symlink() and entry != forest / "manifest.nix":
                assert os.readlink(entry).startswith(graph_paths), entry


def make_root(data: dict[str, Any], directory: Path) -> Path:
    """An image's root file system under directory: its closure, its forest and /tmp."""
    root = directory / Path(data["forest"]).name
    store = root / "nix" / "store"
    store.mkdir(parents=True)
    for entry in data["graph"]:
        shutil.copytree(entry["path"], store / Path(entry["path"]).name, symlinks=True)
    shutil.copytree(
        data["forest"], root, symlinks=True, dirs_exist_ok=True,
        ignore=lambda directory, names: ["manifest.nix"] if directory == data["forest"] else [],
    )  # fmt: skip
    (root / "tmp").mkdir()
    return root


def run_in_root(root: Path, *command: str, stdin: str = "") -> str:
    """Runs a command chrooted into root, with an empty environment; its stdout."""
    chroot = shutil.which("chroot")
    if chroot is None:
        pytest.skip("no chroot command")
    completed = subprocess.run(
        [chroot, str(root), *command],
        input=stdin, capture_output=True, text=True, check=True, timeout=30, env={},
    )  # fmt: skip
    return completed.stdout


def check_images_run_in_a_chroot(
    directory: Path, hello_image: dict[str, Any], names_image: dict[str, Any]
) -> None:
    """Runs every program of HELLO_IMAGE and NAMES_IMAGE in a chroot of its closure."""
    hello_root = make_root(hello_image, directory)
    assert run_in_root(hello_root, "/bin/hello") == "Hello, world!\n"

    root = make_root(names_image, directory)

    def run(*command: str, stdin: str = "") -> str:
        return run_in_root(root, *command, stdin=stdin)

    assert run("/bin/greet", "you") == "Greetings, you!\n"
    assert run("/bin/diamond-top").split() == [
        "diamond-base", "diamond-left", "diamond-base", "diamond-right", "diamond-top",
    ]  # fmt: skip
    assert run("/bin/chain-a").split() == ["chain-c", "chain-b", "chain-a"]
    assert run("/bin/camel-case") == "camelCase\n"
    assert run("/bin/1password") == "1password stand-in\n"
    assert run("/bin/bash", "-c", "echo $((6 * 7))") == "42\n"
    assert run("/bin/sh", "-c", "ls /bin | wc -l").strip() != "0"
    assert run("/usr/bin/env", "echo", "via env") == "via env\n"
    run("/bin/sponge", "/tmp/soaked", stdin="soaked up\n")
    assert (root / "tmp" / "soaked").read_text() == "soaked up\n"
    assert run("/bin/ts", stdin="line\n").endswith("line\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")
def test_images_run_in_a_chroot_of_their_closure(
    tmp_path: Path, hello_image: dict[str, Any], names_image: dict[str, Any]
) -> None:
    check_images_run_in_a_chroot(tmp_path, hello_image, names_image)


def test_shared_dependencies_appear_once(nix: Any, names_image: dict[str, Any]) -> None:
    names = [nix.store_name(entry["path"]) for entry in names_image["graph"]]
    assert len(names) == len(set(names))
    graph = by_path(names_image)
    top = names_image["roots"]["diamond-top"]
    top_closure = closure(graph, top)
    assert sorted(nix.store_name(path) for path in top_closure) == [
        "busybox", "diamond-base", "diamond-left", "diamond-right", "diamond-top",
    ]  # fmt: skip
    assert graph[top]["closureSize"] == sum(graph[path]["narSize"] for path in top_closure)
    chain = closure(graph, names_image["roots"]["chain-a"])
    assert sorted(nix.store_name(path) for path in chain) == [
        "busybox", "chain-a", "chain-b", "chain-c",
    ]  # fmt: skip


# Finding packages by name


def test_lenient_names_find_their_packages(nix: Any, names_image: dict[str, Any]) -> None:
    found = {name: nix.store_name(path) for name, path in names_image["roots"].items()}
    assert found == {
        "tools.greet": "greet",
        "bashinteractive": "bash-interactive",
        "camelcase": "camel-case",
        "1password": "1password",
        "diamond-top": "diamond-top",
        "chain-a": "chain-a",
        "coreutils": "coreutils",
        "moreutils": "moreutils",
        "nano": "nano",
    }


def test_missing_names_are_reported_together(nix: Any) -> None:
    prepared = nix.prepare_demo_image(["nope1", "hello", "nope2"])
    assert prepared.returncode == 0, prepared.stderr
    assert prepared.data == {"error": "not_found", "pkgs": ["nope1", "nope2"]}


def test_only_derivations_count_as_packages(nix: Any) -> None:
    not_packages = [
        "tools",  # an attribute set
        "removed",  # throws when evaluated
        "removed.inner",
        "tools.greet.extra",
        "hello.name",  # a string
        "",
        "hello.",
        'hello"; builtins.abort "names are data',
    ]
    prepared = nix.prepare_demo_image(["hello", *not_packages])
    assert prepared.returncode == 0, prepared.stderr
    assert prepared.data == {"error": "not_found", "pkgs": not_packages}


RESOLUTION_CASES: dict[str, str | None] = {
    "hello": "hello",
    "HELLO": "hello",
    "bashinteractive": "bash",
    "foo": "lower-foo",  # the exact name wins
    "Foo": "upper-foo",
    "FOO": "upper-foo",  # else the first of the sorted matches
    "1password": "1password",
    "7zip": "7zip",  # the plain name wins over the `_` one
    "haskellpackages.stylish-haskell": "stylish-haskell",
    "python3.pkgs.requests": "requests",
    "removed": None,
    "removed.x": None,
    "notapackage": None,
    "astring": None,
    "hello.name": None,
    "nope": None,
    "": None,
    ".hello": None,
}


def test_name_resolution_rules(nix: Any) -> None:
    resolve = nix.nix_dir / "resolve.nix"
    names = list(RESOLUTION_CASES)
    found = nix.nix_eval_json(
        f"""
        let
          inherit (import {resolve}) findPackage;
          drv = name: {{ type = "derivation"; inherit name; outPath = "/nix/store/x-${{name}}"; }};
          pkgs = {{
            hello = drv "hello";
            bashInteractive = drv "bash";
            foo = drv "lower-foo";
            Foo = drv "upper-foo";
            _1password = drv "1password";
            "7zip" = drv "7zip";
            _7zip = drv "underscore-7zip";
            haskellPackages = {{ stylish-haskell = drv "stylish-haskell"; }};
            python3 = drv "python3" // {{ pkgs = {{ requests = drv "requests"; }}; }};
            # Searching must read names only: forcing this ends the evaluation.
            forcingThisAborts = abort "an attribute value was forced";
            removed = throw "removed";
            notAPackage = {{ }};
            aString = "x";
          }};
          names = builtins.fromJSON ''{json.dumps(names)}'';
        in
        map (name: let found = findPackage pkgs name; in
          if found == null then null else found.name) names
        """
    )
    assert dict(zip(names, found, strict=True)) == RESOLUTION_CASES


# Systems, failures and sources


def test_plain_imports_build_for_another_system(nix: Any) -> None:
    system = other_system(nix.host_system())
    data = nix.prepare_demo_image(CROSS_IMAGE, system=system).ok
    assert sorted(data["roots"]) == sorted(CROSS_IMAGE)
    forest = Path(data["forest"])
    assert (forest / "share" / "doc" / "nixery-demo" / "README").is_file()
    assert (forest / "etc" / "ssl" / "certs" / "ca-bundle.crt").is_file()
    assert (forest / "etc" / "services").is_file()


# aarch64 images, built on this machine


def test_aarch64_hello_carries_an_aarch64_busybox(
    nix: Any, aarch64_hello_image: dict[str, Any]
) -> None:
    graph = by_path(aarch64_hello_image)
    hello = aarch64_hello_image["roots"]["hello"]
    references = graph[hello]["references"]
    assert [nix.store_name(path) for path in references] == ["busybox"]
    busybox = Path(references[0], "bin", "busybox")
    assert elf_machine(busybox) == EM_AARCH64
    assert Path(hello, "bin", "hello").read_text().startswith(f"#!{busybox} sh\n")
    assert os.readlink(Path(aarch64_hello_image["forest"], "bin")) == f"{hello}/bin"
    assert aarch64_hello_image["mainPrograms"]["hello"] == "hello"


def test_aarch64_images_hold_no_binary_for_another_machine(
    aarch64_hello_image: dict[str, Any], aarch64_names_image: dict[str, Any]
) -> None:
    machines: set[int | None] = set()
    for data in (aarch64_hello_image, aarch64_names_image):
        for entry in data["graph"]:
            for dirpath, _, filenames in os.walk(entry["path"]):
                for name in filenames:
                    file = Path(dirpath, name)
                    if not file.is_symlink():
                        machines.add(elf_machine(file))
    assert machines - {None} == {EM_AARCH64}


def test_aarch64_packages_are_built_here_by_the_hosts_busybox(nix: Any) -> None:
    host_busybox = nix.nix_eval_json(f"(import {nix.demo_dir} {{ }}).busybox.outPath")
    builds = nix.nix_eval_json(
        demo_packages_expression(
            nix.demo_dir, AARCH64, "if p ? drvPath then { inherit (p) system builder; } else null"
        )
    )
    plain_imports = {name for name, build in builds.items() if build is None}
    assert plain_imports == {"busybox", "cacert", "iana-etc", "docs"}
    here = {"system": nix.host_system(), "builder": f"{host_busybox}/bin/busybox"}
    assert {name: build for name, build in builds.items() if build is not None} == {
        name: here for name in builds.keys() - plain_imports
    }


def test_host_packages_keep_their_store_paths(nix: Any) -> None:
    paths = nix.nix_eval_json(
        demo_packages_expression(nix.demo_dir, nix.host_system(), "p.outPath")
    )
    if nix.host_system() != "x86_64-linux" or paths["busybox"] != HOST_BUSYBOX:
        pytest.skip(f"the known paths are for x86_64's {HOST_BUSYBOX}, not {paths['busybox']}")
    assert paths == HOST_STORE_PATHS


def test_plain_imports_are_shared_between_systems(
    hello_image: dict[str, Any], aarch64_hello_image: dict[str, Any]
) -> None:
    # The same store paths, so the same layers in both images.
    host, aarch64 = by_path(hello_image), by_path(aarch64_hello_image)
    for name in ("cacert", "iana-etc"):
        path = hello_image["roots"][name]
        assert aarch64_hello_image["roots"][name] == path
        assert aarch64[path] == host[path]
    assert aarch64_hello_image["roots"]["hello"] != hello_image["roots"]["hello"]


def test_aarch64_images_run_under_emulation(
    tmp_path: Path,
    arm64_emulation: Any,
    aarch64_hello_image: dict[str, Any],
    aarch64_names_image: dict[str, Any],
) -> None:
    hello = Path(aarch64_hello_image["roots"]["hello"], "bin", "hello")
    completed = subprocess.run([str(hello)], capture_output=True, text=True, check=True, timeout=30)
    assert completed.stdout == "Hello, world!\n"
    # No qemu in these roots: the kernel runs the interpreter it holds (flag F).
    check_images_run_in_a_chroot(tmp_path, aarch64_hello_image, aarch64_names_image)


def test_systems_without_payloads_say_so(nix: Any, tmp_path: Path) -> None:
    without_arm64 = tmp_path / "demo"
    shutil.copytree(
        nix.demo_dir, without_arm64, symlinks=True, ignore=shutil.ignore_patterns("arm64")
    )
    src_args = {"path": str(without_arm64)}
    missing = nix.prepare_image("path", src_args, ["hello"], system=AARCH64)
    assert missing.returncode != 0
    assert "the aarch64-linux packages need the arm64 busybox" in missing.stderr
    assert "`make demo-arm64` fetches it" in missing.stderr
    # Plain imports need no payload.
    assert nix.prepare_image("path", src_args, CROSS_IMAGE, system=AARCH64).ok
    unknown = nix.prepare_demo_image(["hello"], system="riscv64-linux")
    assert unknown.returncode != 0
    assert "no packages for system 'riscv64-linux'" in unknown.stderr


def test_a_package_that_fails_to_build_fails_nix_build(nix: Any) -> None:
    prepared = nix.prepare_demo_image(["hello", "broken"])
    assert prepared.returncode != 0
    assert "builder for '/nix/store/" in prepared.stderr
    assert "-broken.drv' failed" in prepared.stderr
    assert "fails to build on purpose" in prepared.stderr


def test_large_is_at_least_50_megabytes(nix: Any) -> None:
    data = nix.prepare_demo_image(["large"]).ok
    large = by_path(data)[data["roots"]["large"]]
    assert large["narSize"] >= 50 * 1024 * 1024


def test_popularity_names_every_demo_store_path(
    nix: Any, hello_image: dict[str, Any], names_image: dict[str, Any]
) -> None:
    popularity = json.loads((nix.demo_dir / "popularity.json").read_text())
    assert popularity["busybox"] >= 100
    assert all(isinstance(count, int) for count in popularity.values())
    for data in (hello_image, names_image):
        for entry in data["graph"]:
            assert nix.store_name(entry["path"]) in popularity


def test_builds_are_deterministic(nix: Any, hello_image: dict[str, Any]) -> None:
    again = nix.prepare_demo_image(HELLO_IMAGE)
    assert again.ok == hello_image
    # --check builds the result again and fails if a single byte differs.
    checked = nix.prepare_image(
        "path", {"path": str(nix.demo_dir)}, HELLO_IMAGE, extra_args=("--check",)
    )
    assert checked.returncode == 0, checked.stderr
    demo_packages = ["-A", "hello", "-A", "coreutils", "-A", "diamond-top"]
    packages = nix.run_nix(
        ["nix-build", "--no-out-link", "--check", str(nix.demo_dir), *demo_packages]
    )
    assert packages.returncode == 0, packages.stderr


@pytest.fixture(scope="session")
def demo_git_repo(tmp_path_factory: pytest.TempPathFactory, nix: Any) -> dict[str, str]:
    """A git repository of the demo set with a history to select from.

    main: c1 (tagged v1) -> c3; branch feature: c1 -> c2. Each commit adds a
    line to the docs' README, so the docs package tells which one was built.
    Returns the url and the commit ids.
    """
    repo = tmp_path_factory.mktemp("demo-git") / "repo"
    shutil.copytree(nix.demo_dir, repo, symlinks=True)
    readme = repo / "files" / "docs" / "share" / "doc" / "nixery-demo" / "README"
    env = {
        **os.environ,
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
    }

    def git(*args: str) -> str:
        completed = subprocess.run(
            ["git", "-C", str(repo), *args], env=env, capture_output=True, text=True, check=True
        )
        return completed.stdout.strip()

    def commit(line: str) -> str:
        with readme.open("a") as file:
            file.write(line + "\n")
        git("commit", "--quiet", "--all", "--message", line)
        return git("rev-parse", "HEAD")

    git("init", "--quiet", "--initial-branch=main")
    git("add", ".")
    git("commit", "--quiet", "--message", "c1")
    c1 = git("rev-parse", "HEAD")
    git("tag", "v1")
    git("checkout", "--quiet", "-b", "feature")
    c2 = commit("c2 on feature")
    git("checkout", "--quiet", "main")
    c3 = commit("c3 on main")
    return {"url": f"file://{repo}", "c1": c1, "c2": c2, "c3": c3}


@pytest.mark.parametrize(
    ("ref", "rev_of", "expected"),
    [
        (None, None, "c3"),
        ("main", None, "c3"),
        ("feature", None, "c2"),
        ("v1", None, "c1"),
        (None, "c2", "c2"),  # a commit that is on no default branch
        (None, "c1", "c1"),
    ],
)
def test_git_sources(
    nix: Any,
    demo_git_repo: dict[str, str],
    hello_image: dict[str, Any],
    ref: str | None,
    rev_of: str | None,
    expected: str,
) -> None:
    src_args = {
        "url": demo_git_repo["url"],
        "ref": ref,
        "rev": demo_git_repo[rev_of] if rev_of else None,
    }
    data = nix.prepare_image("git", src_args, ["docs", "hello"]).ok
    readme = Path(data["roots"]["docs"], "share", "doc", "nixery-demo", "README").read_text()
    last_line = readme.splitlines()[-1]
    if expected == "c1":
        assert not last_line.startswith("c")
    else:
        assert last_line.startswith(expected)
    # The same derivation from another source is the same store path.
    assert data["roots"]["hello"] == hello_image["roots"]["hello"]
