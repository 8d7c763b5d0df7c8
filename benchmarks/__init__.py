"""Benchmarks: our code against a peer, in the same run, on the same bytes.

``python -m benchmarks`` (``make bench``) runs every benchmark and rewrites
``docs/benchmarks.md`` and ``docs/benchmarks.png``; ``--quick`` runs each on
small inputs for a few seconds (the smoke test in ``make test``), writing to
a directory of its choice.  Nothing here asserts a speed: each benchmark
returns measurements and :class:`~benchmarks.common.Check` rows (a ratio
and the target it is held to), and the report says which targets are met.

::

    pipeline.py   layer writer vs `tar | tee >(sha256sum) | gzip -6 | sha256sum`,
                  vs the deflate engine's own speed; engine/level/threads/read sweeps;
                  peak RSS writing a 1 GB layer
    serving.py    blob GETs vs nginx (sendfile) with wrk, 1 and 16 streams, Range;
                  warm manifest GETs vs CNCF distribution (docker-registry)
    builds.py     cold build split into nix-build / layering / layer writing / rest;
                  layering a synthetic 5,000-path closure
    connections.py  a normal client's latency beside 1,000 idle and 200 slow-header
                  connections
    report.py     the markdown table and the PNG chart
    common.py     machine facts, processes, wrk, the Check row
"""
