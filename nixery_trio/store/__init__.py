"""The store on disk: content-addressed blobs, the msgpack-indexed caches and
tag records, the flock locks every process on one store shares, the board of
builds in progress and recent, and what the store holds."""
