# A package that needs no build step: a path already copied into the store,
# shaped like a derivation (`type = "derivation"`, which is what nixpkgs'
# lib.isDerivation and the image builder check) so it can be asked for by
# name. Nothing runs to produce it, so it exists for every system. It has no
# drvPath, so `nix-build -A` cannot build it on its own; prepare-image.nix
# only needs its outPath.
name: path: {
  type = "derivation";
  inherit name;
  outPath = path;
  outputName = "out";
  outputs = [ "out" ];
}
