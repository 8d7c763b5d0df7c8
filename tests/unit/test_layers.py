"""The layering algorithm: Nixery's worked example, edge cases and properties."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nixery_trio.core.layers import (
    DEFAULT_BUDGET,
    POPULARITY_THRESHOLD,
    SIZE_THRESHOLD,
    Layer,
    StorePathInfo,
    group_layers,
)

MB = 1000 * 1000
NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"


def store_path(name: str) -> str:
    """A realistic store path with a hash derived from the name."""
    digest = hashlib.sha256(name.encode()).digest()
    return "/nix/store/" + "".join(NIX_BASE32[b % 32] for b in digest[:32]) + "-" + name


def info(path: str, refs: Sequence[str] = (), nar: int = 1, closure: int = 1) -> StorePathInfo:
    # Nix lists every path as referring to itself; do the same.
    return StorePathInfo(path=path, references=(path, *refs), nar_size=nar, closure_size=closure)


def as_sets(layers: Sequence[Layer]) -> set[frozenset[str]]:
    return {frozenset(layer.contents) for layer in layers}


# Nixery's example: root -> A, B, C, D; A, B, C -> E; D -> F, G.
A = store_path("curl-8.4.0")
B = store_path("git-2.42.0")
C = store_path("jq-1.7")
D = store_path("python3-3.11.6")
E = store_path("glibc-2.38-27")
F = store_path("zlib-1.3")
G = store_path("llvm-16.0.6-lib")

# Ratings (popularity of the head x NAR size of the layer):
#   G = 5 x 120 MB = 600 M   (over the size threshold, so its own layer)
#   E = 150 x 2 MB = 300 M   (over the popularity threshold, so its own layer)
#   {D, F} = 1 x (5 + 10) MB = 15 M
#   C = 12 M, B = 11 M, A = 10 M, and A + B = 21 M > {D, F}, which tells
#   Nixery's fold (merged layer stays in front) from a re-sorting merge.
EXAMPLE_GRAPH = (
    info(A, [E], nar=10 * MB, closure=12 * MB),
    info(B, [E], nar=11 * MB, closure=13 * MB),
    info(C, [E], nar=12 * MB, closure=14 * MB),
    info(D, [F, G], nar=5 * MB, closure=135 * MB),
    info(E, nar=2 * MB, closure=2 * MB),
    info(F, nar=10 * MB, closure=10 * MB),
    info(G, nar=120 * MB, closure=120 * MB),
)
EXAMPLE_ROOTS = (A, B, C, D)
EXAMPLE_POPULARITY = {"glibc-2.38-27": 150, "llvm-16.0.6-lib": 5, "unrelated": 7}


def example(budget: int) -> list[Layer]:
    return group_layers(EXAMPLE_GRAPH, EXAMPLE_ROOTS, EXAMPLE_POPULARITY, budget)


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (1, [{A, B, C, D, E, F, G}]),
        (2, [{G}, {A, B, C, D, E, F}]),
        (3, [{G}, {E}, {A, B, C, D, F}]),
        (4, [{G}, {E}, {A, B, C}, {D, F}]),
        (10, [{G}, {E}, {D, F}, {C}, {B}, {A}]),
    ],
)
def test_nixery_worked_example(budget: int, expected: list[set[str]]) -> None:
    layers = example(budget)
    assert as_sets(layers) == {frozenset(layer) for layer in expected}
    # Highest rating first, as listed above (at budget 4, A + B + C = 33 M > {D, F}).
    assert [set(layer.contents) for layer in layers] == expected


def test_worked_example_ratings() -> None:
    ratings = {layer.contents: layer.merge_rating for layer in example(10)}
    assert ratings == {
        (G,): 5 * 120 * MB,
        (E,): 150 * 2 * MB,
        tuple(sorted((D, F))): 15 * MB,
        (C,): 12 * MB,
        (B,): 11 * MB,
        (A,): 10 * MB,
    }
    merged = example(4)
    assert merged[2] == Layer(contents=tuple(sorted((A, B, C))), merge_rating=33 * MB)
    assert sum(layer.merge_rating for layer in example(1)) == sum(ratings.values())


def test_without_thresholds_g_stays_with_d_and_e_alone_by_dominance() -> None:
    quiet = [
        StorePathInfo(p.path, p.references, p.nar_size, min(p.closure_size, SIZE_THRESHOLD))
        for p in EXAMPLE_GRAPH
    ]
    layers = group_layers(quiet, EXAMPLE_ROOTS, {}, 10)
    assert as_sets(layers) == {
        frozenset({A}),
        frozenset({B}),
        frozenset({C}),
        frozenset({D, F, G}),
        frozenset({E}),
    }


def test_layer_contents_are_sorted_and_key_is_blake3_of_them() -> None:
    for layer in example(3):
        assert list(layer.contents) == sorted(layer.contents)
        assert layer.key == blake3.blake3("\n".join(layer.contents).encode()).hexdigest()
    assert Layer(contents=(A, B), merge_rating=1).key == Layer(contents=(A, B), merge_rating=9).key
    assert Layer(contents=(A,), merge_rating=1).key != Layer(contents=(B,), merge_rating=1).key


def test_cacert_and_iana_etc_are_forced_to_the_top() -> None:
    cacert = store_path("nss-cacert-3.95")
    iana = store_path("iana-etc-20231227")
    plain = store_path("cacert")
    hello = store_path("hello-2.12.1")
    lookalike = store_path("cacertificates-1.0")
    graph = [
        info(hello, [cacert, iana, plain, lookalike], nar=1000),
        info(cacert, nar=10),
        info(iana, nar=10),
        info(plain, nar=10),
        info(lookalike, nar=10),
    ]
    popularity = {"hello-2.12.1": 10**6, "cacertificates-1.0": 99}
    layers = group_layers(graph, [hello], popularity, DEFAULT_BUDGET)
    by_head = {layer.contents: layer.merge_rating for layer in layers}
    top = 10**6 + 1
    # Referenced only by hello, yet their own layers, above glibc-like popularity.
    assert by_head == {
        tuple(sorted((hello, lookalike))): 10**6 * 1010,
        (cacert,): top * 10,
        (iana,): top * 10,
        (plain,): top * 10,
    }


def test_unknown_popularity_is_one_and_known_zero_is_kept() -> None:
    one, zero = store_path("one-1"), store_path("zero-1")
    layers = group_layers([info(one, nar=7), info(zero, nar=7)], [one, zero], {"zero-1": 0})
    assert {layer.contents: layer.merge_rating for layer in layers} == {(one,): 7, (zero,): 0}


def test_popularity_threshold_is_inclusive_and_size_threshold_exclusive() -> None:
    top = store_path("top-1")
    popular, nearly = store_path("popular-1"), store_path("nearly-1")
    big, exact = store_path("big-1"), store_path("exact-1")
    graph = [
        info(top, [popular, nearly, big, exact]),
        info(popular),
        info(nearly),
        info(big, closure=SIZE_THRESHOLD + 1),
        info(exact, closure=SIZE_THRESHOLD),
    ]
    popularity = {"popular-1": POPULARITY_THRESHOLD, "nearly-1": POPULARITY_THRESHOLD - 1}
    assert as_sets(group_layers(graph, [top], popularity)) == {
        frozenset({top, nearly, exact}),
        frozenset({popular}),
        frozenset({big}),
    }


def test_empty_image_has_no_layers() -> None:
    assert group_layers([], [], {}) == []


def test_duplicate_identical_entries_and_references_are_harmless() -> None:
    repeated_refs = info(D, [F, G, F, D], nar=5 * MB, closure=135 * MB)
    graph = [repeated_refs if i.path == D else i for i in EXAMPLE_GRAPH] + [EXAMPLE_GRAPH[0]]
    assert group_layers(graph, [*EXAMPLE_ROOTS, A], EXAMPLE_POPULARITY, 4) == example(4)


@pytest.mark.parametrize("budget", [0, -1])
def test_budget_below_one_is_rejected(budget: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        example(budget)


@pytest.mark.parametrize(
    ("graph", "roots", "complaint"),
    [
        (EXAMPLE_GRAPH, [store_path("other-1")], "roots are not in the closure graph"),
        (EXAMPLE_GRAPH[:-1], EXAMPLE_ROOTS, "refers to .*llvm.*not in the closure graph"),
        (
            (
                *EXAMPLE_GRAPH,
                info(store_path("x-1"), [store_path("y-1")]),
                info(store_path("y-1"), [store_path("x-1")]),
            ),
            EXAMPLE_ROOTS,
            "2 paths .* in reference cycles that no root reaches",
        ),
        ((*EXAMPLE_GRAPH, info(A, nar=3)), EXAMPLE_ROOTS, "listed twice"),
        ((info("/usr/bin/hello"),), ["/usr/bin/hello"], "not a Nix store path"),
        ((info(A, nar=-1),), [A], "negative size"),
    ],
)
def test_inconsistent_graphs_are_rejected(
    graph: Sequence[StorePathInfo], roots: Sequence[str], complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):
        group_layers(graph, roots, EXAMPLE_POPULARITY, 4)


def test_unreferenced_paths_are_roots_too() -> None:
    # The shell adds helper paths (the /usr/bin/env link) that no requested
    # package refers to; they must still land in a layer.
    env_link = store_path("usr-bin-env")
    with_helper = group_layers([*EXAMPLE_GRAPH, info(env_link, nar=100)], EXAMPLE_ROOTS, {}, 10)
    assert frozenset({env_link}) in as_sets(with_helper)
    # A root list that omits unreferenced paths changes nothing.
    assert group_layers(EXAMPLE_GRAPH, (A,), EXAMPLE_POPULARITY, 4) == example(4)
    assert group_layers(EXAMPLE_GRAPH, (), EXAMPLE_POPULARITY, 4) == example(4)


def test_requested_path_referenced_by_another_gets_its_own_layer() -> None:
    # Requesting F explicitly puts an edge from the root to it, like popularity does.
    layers = group_layers(EXAMPLE_GRAPH, (*EXAMPLE_ROOTS, F), {}, 10)
    assert frozenset({F}) in as_sets(layers)
    assert frozenset({F}) not in as_sets(group_layers(EXAMPLE_GRAPH, EXAMPLE_ROOTS, {}, 10))


def test_unreached_cycle_is_an_error_even_when_popular() -> None:
    x, y = store_path("openssl-3.0.12"), store_path("y-1")
    graph = [*EXAMPLE_GRAPH, info(x, [y]), info(y, [x])]
    popularity = {**EXAMPLE_POPULARITY, "openssl-3.0.12": 10**6}
    with pytest.raises(ValueError, match="reference cycles"):
        group_layers(graph, EXAMPLE_ROOTS, popularity, 4)


def test_reference_cycles_do_not_break_grouping() -> None:
    a, b, c = store_path("a-1"), store_path("b-1"), store_path("c-1")
    graph = [info(a, [b]), info(b, [c]), info(c, [b])]
    assert as_sets(group_layers(graph, [a], {})) == {frozenset({a, b, c})}


def test_five_thousand_paths() -> None:
    # Size check only (no timing assertion): a wide, deep random closure.
    graph, roots = random_closure(random.Random(5), 5000)
    layers = group_layers(graph, roots, {}, DEFAULT_BUDGET)
    assert len(layers) <= DEFAULT_BUDGET
    assert sorted(p for layer in layers for p in layer.contents) == sorted(i.path for i in graph)


# ---------------------------------------------------------------- properties


def random_closure(rng: random.Random, size: int) -> tuple[list[StorePathInfo], list[str]]:
    paths = [store_path(f"pkg{i}-1.{i}") for i in range(size)]
    graph = []
    for index, path in enumerate(paths):
        later = paths[index + 1 :]
        refs = rng.sample(later, min(len(later), rng.randint(0, 4)))
        graph.append(info(path, refs, nar=rng.randint(0, 10**6), closure=rng.randint(0, 2 * 10**8)))
    referenced = {ref for i in graph for ref in i.references if ref != i.path}
    return graph, [p for p in paths if p not in referenced]


@st.composite
def closures(
    draw: st.DrawFn,
) -> tuple[list[StorePathInfo], list[str], dict[str, int]]:
    """A random DAG, restricted to the closure of randomly chosen roots."""
    count = draw(st.integers(min_value=1, max_value=14))
    names = [f"p{i}-{i}.0" for i in range(count)]
    paths = [store_path(name) for name in names]
    refs = {
        path: draw(st.sets(st.sampled_from(paths[index + 1 :]))) if index + 1 < count else set()
        for index, path in enumerate(paths)
    }
    roots = draw(st.lists(st.sampled_from(paths), min_size=1, unique=True))
    closure: set[str] = set()
    pending = list(roots)
    while pending:
        node = pending.pop()
        if node not in closure:
            closure.add(node)
            pending.extend(refs[node])
    sizes = st.integers(min_value=0, max_value=3 * 10**8)
    graph = [
        StorePathInfo(
            path=path,
            references=tuple(sorted(refs[path])),
            nar_size=draw(st.integers(min_value=0, max_value=10**6)),
            closure_size=draw(sizes),
        )
        for path in paths
        if path in closure
    ]
    popularity = draw(
        st.dictionaries(st.sampled_from(names), st.integers(min_value=0, max_value=300))
    )
    return graph, roots, popularity


budgets = st.integers(min_value=1, max_value=20)


@given(closures(), budgets)
def test_every_path_in_exactly_one_layer_within_budget(
    case: tuple[list[StorePathInfo], list[str], dict[str, int]], budget: int
) -> None:
    graph, roots, popularity = case
    layers = group_layers(graph, roots, popularity, budget)
    assert 1 <= len(layers) <= budget
    placed = [path for layer in layers for path in layer.contents]
    assert sorted(placed) == sorted(i.path for i in graph)
    for layer in layers:
        assert list(layer.contents) == sorted(layer.contents)
    ratings = [layer.merge_rating for layer in layers]
    assert ratings == sorted(ratings, reverse=True)


@given(closures(), budgets, st.randoms(use_true_random=False))
def test_deterministic_under_input_permutation(
    case: tuple[list[StorePathInfo], list[str], dict[str, int]],
    budget: int,
    rng: random.Random,
) -> None:
    graph, roots, popularity = case
    shuffled = [
        StorePathInfo(
            i.path, tuple(rng.sample(i.references, len(i.references))), i.nar_size, i.closure_size
        )
        for i in rng.sample(graph, len(graph))
    ]
    shuffled_popularity = dict(rng.sample(list(popularity.items()), len(popularity)))
    expected = group_layers(graph, roots, popularity, budget)
    assert group_layers(shuffled, rng.sample(roots, len(roots)), shuffled_popularity, budget) == (
        expected
    )


@given(closures(), budgets)
def test_self_references_are_dropped(
    case: tuple[list[StorePathInfo], list[str], dict[str, int]], budget: int
) -> None:
    graph, roots, popularity = case
    with_self = [
        StorePathInfo(i.path, (*i.references, i.path), i.nar_size, i.closure_size) for i in graph
    ]
    assert group_layers(with_self, roots, popularity, budget) == group_layers(
        graph, roots, popularity, budget
    )


@given(closures())
def test_huge_budget_gives_one_layer_per_root_child_of_the_dominator_tree(
    case: tuple[list[StorePathInfo], list[str], dict[str, int]],
) -> None:
    """Checked against dominators computed naively, independently of networkx."""
    graph, roots, popularity = case
    layers = group_layers(graph, roots, popularity, budget=10**6)
    edges = reference_edges(graph, roots, popularity)
    nodes = {i.path for i in graph}

    def dominates(dominator: str, node: str) -> bool:
        return node not in reachable(edges, avoiding=dominator)

    heads = {n for n in nodes if not any(dominates(d, n) for d in nodes - {n})}
    assert len(layers) == len(heads)
    for layer in layers:
        (head,) = heads & set(layer.contents)
        assert all(dominates(head, path) for path in layer.contents if path != head)


@given(closures(), budgets)
def test_merging_is_nixerys_fold_of_the_sorted_layers(
    case: tuple[list[StorePathInfo], list[str], dict[str, int]], budget: int
) -> None:
    graph, roots, popularity = case
    unmerged = group_layers(graph, roots, popularity, budget=10**6)
    layers = sorted(unmerged, key=lambda layer: (layer.merge_rating, layer.contents))
    while len(layers) > budget:  # Nixery's loop, literally
        layers[1] = Layer(
            contents=tuple(sorted(layers[0].contents + layers[1].contents)),
            merge_rating=layers[0].merge_rating + layers[1].merge_rating,
        )
        del layers[0]
    expected = sorted(layers, key=lambda layer: (-layer.merge_rating, layer.contents))
    assert group_layers(graph, roots, popularity, budget) == expected


@settings(max_examples=20)
@given(st.integers(min_value=0, max_value=2**32))
def test_large_random_closures_partition(seed: int) -> None:
    rng = random.Random(seed)
    graph, roots = random_closure(rng, 300)
    layers = group_layers(graph, roots, {}, 30)
    assert len(layers) <= 30
    assert sorted(p for layer in layers for p in layer.contents) == sorted(i.path for i in graph)
    # Unreferenced paths count as roots, so any subset of roots gives the same layers.
    assert group_layers(graph, rng.sample(roots, rng.randint(0, len(roots))), {}, 30) == layers


# ------------------------------------------------------------------ helpers


def reference_edges(
    graph: Sequence[StorePathInfo], roots: Sequence[str], popularity: Mapping[str, int]
) -> dict[str, set[str]]:
    """The algorithm's graph, rebuilt from the module's documented rules."""
    root = "<root>"
    edges: dict[str, set[str]] = {root: set(roots)}
    for i in graph:
        edges[i.path] = {r for r in i.references if r != i.path}
        name = i.path.split("-", 1)[1]
        if i.closure_size > SIZE_THRESHOLD or popularity.get(name, 1) >= POPULARITY_THRESHOLD:
            edges[root].add(i.path)
    return edges


def reachable(edges: Mapping[str, set[str]], avoiding: str) -> set[str]:
    seen: set[str] = set()
    pending = ["<root>"]
    while pending:
        node = pending.pop()
        if node in seen or node == avoiding:
            continue
        seen.add(node)
        pending.extend(edges[node])
    return seen
