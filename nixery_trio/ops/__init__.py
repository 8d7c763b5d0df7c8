"""Operator commands beside the server: ``prefetch``, ``export`` and
``import`` of bundles, ``ls``, ``fsck`` and ``gc``."""
