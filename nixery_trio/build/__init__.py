"""Making images: package sources and their cache keys, running Nix, the
one-pass layer writer, and the builder that orchestrates them (single flight
per image and per layer, a nursery of layer writes)."""
