# Builds the packages of one image and describes what the image must contain.
#
#   nix-build --no-out-link nix/prepare-image.nix \
#     --argstr srcType path|git|channel --argstr srcArgs '<JSON>' \
#     --argstr system x86_64-linux|aarch64-linux \
#     --argstr packages '["hello","cacert"]'
#
# The result is one store path, a JSON file (see README.md in this folder):
#
#   {"graph": [{"path", "references", "narSize", "closureSize", ...}, ...],
#    "roots": {"<requested name>": "/nix/store/...", ...},
#    "mainPrograms": {"<requested name>": "hello" or null, ...},
#    "forest": "/nix/store/...-forest"}
#
# or, when some names are not packages, {"error": "not_found", "pkgs": [...]}
# and nothing is built. A package that fails to build fails nix-build itself.
#
# Where the data goes: `roots` are the requested packages; `graph` is their
# runtime closure with sizes, from which the server groups store paths into
# layers; `forest` is a symlink forest of the roots (bin/hello ->
# /nix/store/...-hello/bin/hello), which the server puts at the image's root.
# The forest itself is not in the graph, but every path its links reach is.
#
# Package names arrive as JSON data and are only ever looked up as attribute
# names, never evaluated as code. The JSON written by the builders reaches
# them through environment variables or files, never inside shell code.
{ srcType
, srcArgs
, system ? builtins.currentSystem
, packages
}:
let
  hostSystem = builtins.currentSystem;
  loadPkgs = import ./load-pkgs.nix {
    inherit srcType;
    srcArgs = builtins.fromJSON srcArgs;
  };
  pkgs = loadPkgs system;
  # The result is built here, whatever the image's system is, so its builder
  # comes from the same source loaded for this machine.
  hostPkgs = if system == hostSystem then pkgs else loadPkgs hostSystem;
  hostBusybox = "${hostPkgs.busybox}/bin/busybox";

  inherit (import ./resolve.nix) findPackage;

  # Keeps the first of equal elements, in order.
  unique = builtins.foldl' (kept: x: if builtins.elem x kept then kept else kept ++ [ x ]) [ ];

  names = unique (builtins.fromJSON packages);
  found = map (name: { inherit name; package = findPackage pkgs name; }) names;
  missing = map (f: f.name) (builtins.filter (f: f.package == null) found);

  # A derivation built on this machine by busybox sh running `script`; the
  # other attributes reach the script as environment variables (or, with
  # __structuredAttrs, in .attrs.json).
  hostScript = { name, script, ... }@attrs:
    derivation (builtins.removeAttrs attrs [ "script" ] // {
      system = hostSystem;
      builder = hostBusybox;
      args = [ "sh" "-eu" "-c" script ];
    });

  notFound = hostScript {
    name = "image-not-found.json";
    json = builtins.toJSON { error = "not_found"; pkgs = missing; };
    script = ''printf '%s' "$json" > "$out"'';
  };

  # Each root's default output, as nixpkgs' symlinkJoin would take it.
  roots = builtins.listToAttrs
    (map (f: { inherit (f) name; value = f.package.outPath; }) found);
  rootPaths = unique (map (f: f.package.outPath) found);
  # Each root's meta.mainProgram (what nixpkgs' lib.getExe runs), or null;
  # a value that throws, or is no string, counts as none.
  mainPrograms = builtins.listToAttrs (map
    (f: {
      inherit (f) name;
      value =
        let tried = builtins.tryEval (f.package.meta.mainProgram or null);
        in if tried.success && builtins.isString tried.value then tried.value else null;
    })
    found);

  # usr/bin/env -> /bin/env, which many scripts' shebangs need; /bin/env
  # itself comes from a package such as coreutils.
  usrBinEnv = builtins.path { path = ./env-link; name = "usr-bin-env"; };
  forestPaths = rootPaths ++ [ usrBinEnv ];

  # builtin:buildenv is the symlink-forest builder of nix-env profiles. It
  # needs no shell and runs for any system. Each package gets its own
  # priority (lower wins), in the order asked for, because two packages with
  # equal priorities that provide the same file are a hard error.
  forest = derivation {
    name = "forest";
    system = hostSystem;
    builder = "builtin:buildenv";
    # buildenv links this as manifest.nix into the forest; the image leaves
    # it out.
    manifest = builtins.toFile "manifest.nix" "[ ]";
    derivations = builtins.concatLists (builtins.genList
      (i: [ "true" (i + 1) 1 (builtins.elemAt forestPaths i) ])
      (builtins.length forestPaths));
  };

  # The runtime closure of everything the forest links to. With
  # __structuredAttrs, exportReferencesGraph puts the closure, with sizes,
  # into .attrs.json in the build directory. (Nix 2.8 neither sets $out nor
  # points NIX_ATTRS_JSON_FILE inside the sandbox in this mode.)
  #
  # There is no JSON tool here, only busybox. But Nix writes .attrs.json as
  # one line of compact JSON with sorted keys (args are left out), so for this
  # derivation it reads
  #   {"builder":"…","closure":[…],"exportReferencesGraph":{"closure":[…]},
  #    "name":"…","outputs":{"out":"…"},"system":"…"}
  # and `closure` is what lies between `"closure":` and the next top-level
  # key; store paths, hashes and numbers contain no quotes.
  closureGraph = hostScript {
    name = "closure-graph.json";
    __structuredAttrs = true;
    exportReferencesGraph.closure = forestPaths;
    script = ''
      out=$(sed -n 's/.*,"outputs":{"out":"\([^"]*\)"}.*/\1/p' .attrs.json)
      sed -n 's/^{"builder":"[^"]*","closure":\(\[.*\]\),"exportReferencesGraph":{"closure":\[.*$/\1/p' \
        .attrs.json > "$out"
      if ! [ -s "$out" ]; then
        echo "closure-graph: unexpected .attrs.json layout:" >&2
        head -c 300 .attrs.json >&2
        exit 1
      fi
    '';
  };

  contents = hostScript {
    name = "image-contents.json";
    graph = closureGraph;
    # The other fields as a JSON object; its `{` gives way to the graph.
    fields = builtins.toJSON { inherit roots mainPrograms; forest = "${forest}"; };
    script = ''
      { printf '{"graph":'; cat "$graph"; printf ',%s' "''${fields#?}"; } > "$out"
    '';
  };
in
if missing != [ ] then notFound else contents
