"""The pure core: what an image is, with no I/O and no Trio.

Image names and meta-packages, digests, Nixery's layering algorithm, image
configs, manifests and indexes, the root filesystem's fixed files, the
``/v2/`` URL space, byte ranges, and the one error hierarchy.  Fast unit and
property tests cover all of it.
"""
