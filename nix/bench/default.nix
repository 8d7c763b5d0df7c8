# A package set for the benchmarks: real binaries and libraries of this host,
# imported into the store as they are, with no build step.
#
#   usr-bin   /usr/bin                     as bin/...            (~400 MB on Debian 12)
#   usr-lib   /usr/lib/<multiarch triplet> as lib/<triplet>/...  (shared libraries)
#   busybox   the demo set's busybox (prepare-image.nix writes its JSON with it)
#   cacert, iana-etc   the demo set's (the server adds both to every image)
#
# `builtins.path` copies a host directory into the store at evaluation time
# (once; later evaluations hash it and find it there), so these packages
# exist for every system and need nothing but the files. The filters keep
# the /usr prefix, so an image of usr-bin has its programs under /bin. The
# store path changes when the host's files do; the benchmarks layer whatever
# is there, on both sides of every comparison.
#
# Called as nixpkgs is: `import ./. { inherit system; config = {}; overlays = []; }`.
{ system ? builtins.currentSystem, ... }:
let
  demo = import ../demo { inherit system; };

  # A store path shaped like a derivation (see demo/store-import.nix).
  storeImport = import ../demo/store-import.nix;

  hasPrefix = prefix: s: builtins.substring 0 (builtins.stringLength prefix) s == prefix;

  # /usr/<sub> and everything under it, placed at <sub> in the store path.
  importUsr = name: sub: storeImport name (builtins.path {
    path = /usr;
    inherit name;
    filter = path: type:
      let dir = "/usr/${sub}"; in
      hasPrefix "${path}/" "${dir}/" || path == dir || hasPrefix "${dir}/" path;
  });

  triplet = {
    x86_64-linux = "x86_64-linux-gnu";
    aarch64-linux = "aarch64-linux-gnu";
  }.${builtins.currentSystem};
in
{
  inherit (demo) busybox cacert iana-etc;
  usr-bin = importUsr "host-usr-bin" "bin";
  usr-lib = importUsr "host-usr-lib" "lib/${triplet}";
}
