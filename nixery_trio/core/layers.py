r"""Grouping a closure of store paths into image layers (Nixery's algorithm).

Why
===

An image is the runtime closure of its packages: every store path they
refer to, directly or not.  Putting each store path in its own layer would
share the most between images, but registries and runtimes limit the number
of layers (Docker's overlay driver tops out near 128; Nixery keeps a budget of
94 and one layer for the symlink forest).  Putting everything in one layer
would share nothing.  The goal is a grouping that is *likely to come out the
same* for other images with overlapping dependencies, so that a popular path
such as ``glibc`` lands in an identical layer, with an identical digest, in
thousands of images, and clients download it once.

Inputs
======

* the closure graph from Nix (``exportReferencesGraph``): every store path
  with its references, NAR size and closure size;
* the requested top-level paths (``roots``).  The graph may hold more than
  their closure (the shell adds helper paths such as ``/usr/bin/env``'s
  link): every path that nothing refers to is treated as a root too, so the
  layers always cover the whole graph and nothing it lists is left out of the
  image;
* popularity data (:mod:`nixery_trio.core.popularity`): how many packages in
  nixpkgs use a path, by the path's name;
* a layer budget.

Algorithm
=========

1. Build a graph with an image root pointing at each requested path, and an
   edge for every reference (Nix lists each path as referring to itself; those
   self references are dropped).  Take the example of an image of A, B, C and
   D, where A, B and C use E, and D uses F and G::

       img (root)
        │
        ├───> A ─────┐
        │            v
        ├───> B ───> E
        │            ^
        ├───> C ─────┘
        │
        └───> D ───> F
              │
              └────> G

2. Decide which paths deserve their own layer even though something else
   refers to them: a path whose closure is over :data:`SIZE_THRESHOLD` (big
   layers are expensive to download twice), or whose popularity is at least
   :data:`POPULARITY_THRESHOLD` (likely shared).  Each gets an extra edge from
   the root.  ``cacert`` and ``iana-etc`` are in every image Nixery builds, so
   they are forced above every other popularity.  Other paths get the
   popularity from the data, or 1 if the data does not know them.

   Say G is over the size threshold and E is popular::

       img ──> A, B, C, D      (requested)
       img ──> E, G            (popular, big)
       A, B, C ──> E;  D ──> F, G

3. Compute the dominator tree from the root.  A path X dominates Y when every
   route from the root to Y goes through X; then Y is only in the image because
   of X, and they can travel together.  Each child of the root in the dominator
   tree, with everything it dominates, is one layer::

       img
        ├───> A
        ├───> B
        ├───> C
        ├───> E
        ├───> D ───> F
        └───> G

   E is shared by A, B and C, so none of them dominates it; it would be
   dominated by the root even without the popularity edge.  G would have been
   dominated by D, but its edge from the root makes it a layer of its own.

4. Rate each layer: the popularity of its head times its total NAR size.  A
   high rating is a layer that is both big and likely shared, which is where
   a layer of its own pays off the most.

5. If there are more layers than the budget, sort them by rating, lowest
   first, once; then repeatedly fold the first layer into the second (ratings
   add up), keeping the merged layer in front, until the budget is met.  The
   least valuable paths thus gather in one catch-all layer, and the most
   valuable ones keep their layers.  Note that the merged layer is *not*
   re-sorted: after ``A+B`` it absorbs ``C`` next even when ``A+B`` outrates
   ``C``, exactly as Nixery does (so it is the first ``n - budget + 1`` layers
   of the sorted list that become one).

6. Return the layers by rating, highest first, each with its paths sorted.
   Ties are broken by the layers' contents, so the result depends only on the
   graph, never on the order Nix listed it in.

Worked example
==============

With ratings G > E > {D, F} > C > B > A and A + B > {D, F} (the test in
``tests/unit/test_layers.py`` uses these numbers: 600 M, 300 M, 15 M, 12 M,
11 M and 10 M), the budget decides, layers listed as returned, highest
rating first:

=======  =================================================
budget   layers
=======  =================================================
1        {A, B, C, D, E, F, G}
2        {G}, {A, B, C, D, E, F}
3        {G}, {E}, {A, B, C, D, F}
4        {G}, {E}, {A, B, C}, {D, F}
10       {G}, {E}, {D, F}, {C}, {B}, {A}   (all six fit)
=======  =================================================

At budget 4 the fold merges A into B, then A + B into C, and the catch-all
(33 M) ends up rated above {D, F} (15 M).  A merge that re-sorted after each
step would have paired C with {D, F} instead: a different grouping from
Nixery's for the same input.

The symlink-forest layer (``/bin`` and friends) is added by the builder; it
is not part of this grouping.

Cost: building the graph and the dominator tree (networkx's Cooper-Harvey-
Kennedy) are near linear for closure graphs; sorting the layers is
O(n log n); the fold is done as one merge of a prefix.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import blake3
import networkx as nx

from .popularity import package_name, store_path_name

DEFAULT_BUDGET = 94
"""Nixery's default layer budget: room for the symlink layer under common limits."""

SIZE_THRESHOLD = 100 * 1000 * 1000
"""A path whose closure is larger than this (bytes) gets its own layer."""

POPULARITY_THRESHOLD = 100
"""A path at least this popular gets its own layer."""

ALWAYS_TOP = frozenset({"cacert", "nss-cacert", "iana-etc"})
"""Package names (without version) forced above every popularity.

Nixery adds ``cacert`` (whose store path is called ``nss-cacert-<version>``)
and ``iana-etc`` to every image, so their layers are the most shared of all.
"""

_ROOT = ""
"""The image root node.  Never a store path: those fail ``store_path_name``."""


@dataclass(frozen=True)
class StorePathInfo:
    """One node of Nix's closure graph.

    ``path`` is the store path; ``references`` the store paths it refers to
    (Nix includes the path itself, which is ignored); ``nar_size`` the size
    of its own contents in bytes; ``closure_size`` the size of it and
    everything it refers to, transitively.
    """

    path: str
    references: tuple[str, ...]
    nar_size: int
    closure_size: int


@dataclass(frozen=True)
class Layer:
    """A group of store paths that become one image layer.

    ``contents`` are the store paths, sorted; ``merge_rating`` is how much
    the layer is worth keeping separate (popularity of its head times its
    size, summed over merged layers).
    """

    contents: tuple[str, ...]
    merge_rating: int

    @property
    def key(self) -> str:
        """A stable identity for caching: blake3 hex of the sorted paths joined by newlines.

        Store paths are content- or input-addressed, so the same paths make
        the same layer, whatever image they are built for.
        """
        return blake3.blake3("\n".join(self.contents).encode()).hexdigest()


def group_layers(
    graph: Sequence[StorePathInfo],
    roots: Sequence[str],
    popularity: Mapping[str, int],
    budget: int = DEFAULT_BUDGET,
) -> list[Layer]:
    """Group the closure ``graph`` of ``roots`` into at most ``budget`` layers.

    See the module docstring for the algorithm.  Every path of ``graph``
    ends up in exactly one layer; paths nothing refers to count as roots.
    Raise :class:`ValueError` if the budget is below 1, or if the graph is
    inconsistent: a root or a reference missing from it, a path listed twice
    with different data, a path that is not a store path, or a reference
    cycle that neither a root nor an unreferenced path leads into (which Nix
    never produces).
    """
    if budget < 1:
        raise ValueError(f"the layer budget must be at least 1, got {budget}")
    infos = _index_graph(graph)
    missing_roots = sorted(set(roots) - infos.keys())
    if missing_roots:
        raise ValueError(f"roots are not in the closure graph: {', '.join(missing_roots)}")

    popularities = _popularities(infos, popularity)
    dominator_graph = _build_graph(infos, roots, popularities)
    children = _dominator_children(dominator_graph)

    layers = sorted(
        (_subtree_layer(head, children, infos, popularities) for head in children[_ROOT]),
        key=_ascending,
    )
    layers = _fold_to_budget(layers, budget)
    return sorted(layers, key=_descending)


def _index_graph(graph: Iterable[StorePathInfo]) -> dict[str, StorePathInfo]:
    """Index the graph by path, rejecting non-store paths and conflicting duplicates."""
    infos: dict[str, StorePathInfo] = {}
    for info in graph:
        store_path_name(info.path)  # raises ValueError for a non-store path
        if info.nar_size < 0 or info.closure_size < 0:
            raise ValueError(f"{info.path} has a negative size")
        known = infos.setdefault(info.path, info)
        if known != info:
            raise ValueError(f"{info.path} is listed twice in the closure graph, differently")
    return infos


def _popularities(infos: Mapping[str, StorePathInfo], data: Mapping[str, int]) -> dict[str, int]:
    """Each path's popularity: forced top, from the data, or 1 when unknown.

    The forced value is above everything in the data (and above the
    threshold), and depends only on the data, so it is the same for every
    image built with it.
    """
    top = max((POPULARITY_THRESHOLD, *data.values())) + 1
    popularities: dict[str, int] = {}
    for path in infos:
        name = store_path_name(path)
        if package_name(name) in ALWAYS_TOP:
            popularities[path] = top
        else:
            popularities[path] = data.get(name, 1)
    return popularities


def _build_graph(
    infos: Mapping[str, StorePathInfo], roots: Iterable[str], popularities: Mapping[str, int]
) -> nx.DiGraph:
    """The reference graph under an image root, with root edges for big or popular paths."""
    graph = nx.DiGraph()
    graph.add_node(_ROOT)
    # Sorted insertion keeps networkx's traversal order independent of Nix's
    # listing order; the dominator tree is unique anyway, this is belt and braces.
    graph.add_nodes_from(sorted(infos))
    for path in sorted(infos):
        for reference in sorted(set(infos[path].references)):
            if reference == path:
                continue
            if reference not in infos:
                raise ValueError(f"{path} refers to {reference}, which is not in the closure graph")
            graph.add_edge(path, reference)
    # Requested paths, and any path nothing refers to (else it would be in no layer).
    unreferenced = (path for path in sorted(infos) if graph.in_degree(path) == 0)
    graph.add_edges_from((_ROOT, root) for root in sorted({*roots, *unreferenced}))

    # Checked before the extra edges below, so that whether a graph is
    # consistent does not depend on popularity data.
    unreachable = sorted(infos.keys() - nx.descendants(graph, _ROOT))
    if unreachable:
        shown = ", ".join(unreachable[:3]) + (", ..." if len(unreachable) > 3 else "")
        raise ValueError(
            f"{len(unreachable)} paths in the closure graph are in reference cycles "
            f"that no root reaches ({shown})"
        )

    graph.add_edges_from(
        (_ROOT, path)
        for path in sorted(infos)
        if infos[path].closure_size > SIZE_THRESHOLD or popularities[path] >= POPULARITY_THRESHOLD
    )
    return graph


def _dominator_children(graph: nx.DiGraph) -> dict[str, list[str]]:
    """The dominator tree from the image root, as node -> its children."""
    immediate = nx.immediate_dominators(graph, _ROOT)
    immediate.pop(_ROOT, None)  # networkx < 3.5 maps the start node to itself
    children: dict[str, list[str]] = {_ROOT: []}
    for node, dominator in immediate.items():
        children.setdefault(dominator, []).append(node)
    return children


def _subtree_layer(
    head: str,
    children: Mapping[str, list[str]],
    infos: Mapping[str, StorePathInfo],
    popularities: Mapping[str, int],
) -> Layer:
    """``head`` and everything it dominates, rated by head popularity times total size."""
    contents = []
    pending = [head]
    while pending:
        path = pending.pop()
        contents.append(path)
        pending.extend(children.get(path, ()))
    size = sum(infos[path].nar_size for path in contents)
    return Layer(contents=tuple(sorted(contents)), merge_rating=popularities[head] * size)


def _fold_to_budget(ascending: list[Layer], budget: int) -> list[Layer]:
    """Nixery's merge loop over layers sorted by rating, lowest first.

    The loop ``layers[1] = merge(layers[0], layers[1]); del layers[0]`` keeps
    the merged layer in front, so it amounts to merging the first
    ``len - budget + 1`` layers into one; done that way it is linear, not
    quadratic, in the number of layers.
    """
    if len(ascending) <= budget:
        return ascending
    cut = len(ascending) - budget + 1
    folded = ascending[:cut]
    catch_all = Layer(
        contents=tuple(heapq.merge(*(layer.contents for layer in folded))),
        merge_rating=sum(layer.merge_rating for layer in folded),
    )
    return [catch_all, *ascending[cut:]]


def _ascending(layer: Layer) -> tuple[int, tuple[str, ...]]:
    return (layer.merge_rating, layer.contents)


def _descending(layer: Layer) -> tuple[int, tuple[str, ...]]:
    return (-layer.merge_rating, layer.contents)
