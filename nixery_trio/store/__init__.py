"""The store on disk: content-addressed blobs, the msgpack-indexed caches and
tag records, and the flock locks every process on one store shares."""
