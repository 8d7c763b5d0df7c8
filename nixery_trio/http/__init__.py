"""The registry's HTTP face: the Quart-Trio ``/v2/`` app and its fast lane,
blob responses by sendfile, the web page at ``/``, the Hypercorn server it
runs on, and the supervisor of worker processes."""
