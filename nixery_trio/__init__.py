"""nixery-trio: a container registry that builds images on demand with Nix."""

__version__ = "0.1.0"
