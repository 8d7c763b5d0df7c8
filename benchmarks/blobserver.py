"""``python -m benchmarks.blobserver READ_SIZE serve ...``: our server with another blob read size.

The read size of blob responses is a constant of ``nixery_trio.blobs`` (the
registry does not pass a setting to it yet); the read-size sweep of the
serving benchmark sets it here, before the server starts, and runs the
real command line.
"""

from __future__ import annotations

import sys

from nixery_trio import blobs
from nixery_trio.cli import main

if __name__ == "__main__":
    blobs.BLOB_READ_SIZE = int(sys.argv.pop(1))
    sys.argv[0] = "nixery-trio"
    main()
