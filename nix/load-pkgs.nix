# Loads the package set an image is built from.
#
#   srcType  "path", "git" or "channel"
#   srcArgs  the source's arguments, already parsed from JSON:
#            path:    { path = "/abs/dir"; }
#            git:     { url = "file:///x or https://..."; ref = "branch or tag" or null;
#                       rev = "40-hex commit" or null; }
#            channel: { name = "nixos-unstable" or a 40-hex nixpkgs commit; }
#
# Returns a function from a system ("x86_64-linux", ...) to the package set,
# imported the way nixpkgs is. Every source is imported with the same
# arguments, so a package set other than nixpkgs (like ./demo) has to accept
# and ignore `config` and `overlays`.
{ srcType, srcArgs }:
let
  # Only the attributes that are set: fetchGit treats a present `ref = null`
  # as an error, not as "the default branch".
  gitArgs =
    { url = srcArgs.url; }
    // (if srcArgs.rev or null != null then {
      rev = srcArgs.rev;
      # Fetch every ref, so a commit that is on no default branch is found.
      allRefs = true;
    } else if srcArgs.ref or null != null then {
      ref = srcArgs.ref;
    } else { });

  src =
    if srcType == "path" then /. + srcArgs.path
    else if srcType == "git" then builtins.fetchGit gitArgs
    else if srcType == "channel" then
      builtins.fetchTarball "https://github.com/NixOS/nixpkgs/archive/${srcArgs.name}.tar.gz"
    else throw "load-pkgs.nix: unknown source type '${srcType}' (expected path, git or channel)";
in
system: import src {
  inherit system;
  config = { };
  overlays = [ ];
}
