# A tiny, offline package set that stands in for nixpkgs in tests and demos.
#
# There is no stdenv here: every build runs the host's static busybox, which is
# imported into the store as is. So everything builds in a second, with no
# network, and every output path is the same on every build (input-addressed
# derivations whose builders write no timestamps).
#
# The packages are real: the scripts run in a chroot that holds nothing but
# their closure, because each one names its interpreter (busybox) and every
# other package it calls by store path, which also makes those paths runtime
# references that Nix finds by itself. The set covers the shapes the image
# builder has to handle: shared dependencies (a diamond and a chain), nested
# and camel-case attribute names, a name starting with a digit, plain store
# imports that "build" for any system, a large package, one that fails, and
# one that throws on evaluation.
#
# Called as nixpkgs is, `import ./. { inherit system; config = {}; overlays = []; }`,
# so it takes the system and ignores the rest.
#
# Two systems: the host's, and aarch64-linux. Nix here cannot run an aarch64
# builder (no remote builders, no extra-platforms), and none is needed: a
# package only writes text and links, so the host's busybox builds every
# package for either system, and only the payload differs. For aarch64 the
# payload is Debian's static busybox for arm64 (fetched by `make demo-arm64`
# into ./arm64, which is not committed): it is the interpreter in the
# scripts' shebangs, the target of the applet links, the blobs of `large`,
# and the `busybox` package itself. Every derivation still says
# `system = builtins.currentSystem`, so Nix builds it here. For the host's
# own system, payload and builder are one busybox, and the derivations are
# exactly those of a set that knows one system (same store paths).
{ system ? builtins.currentSystem, ... }:
let
  hostSystem = builtins.currentSystem;

  # A busybox binary as a store directory holding bin/busybox. It has to be
  # a file named `busybox` in a directory: busybox picks its applet from the
  # name it was called by, and a store path named `<hash>-busybox` is not one.
  busyboxIn = dir: storeImport "busybox" (builtins.path {
    path = dir;
    name = "busybox";
    filter = path: type: path == "${toString dir}/bin" || path == "${toString dir}/bin/busybox";
  });

  # The host's busybox (Debian's busybox-static): the builder of everything.
  hostBusybox = busyboxIn /usr;
  hostBb = "${hostBusybox}/bin/busybox";

  arm64Busybox =
    if builtins.pathExists ./arm64/bin/busybox then busyboxIn ./arm64
    else throw ("nix/demo: the aarch64-linux packages need the arm64 busybox at "
      + "${toString ./.}/arm64/bin/busybox, which is missing; `make demo-arm64` "
      + "fetches it (make serve and make test do too). A git source has it only "
      + "if it is committed.");

  # The busybox that the packages carry and run at run time.
  busybox =
    if system == hostSystem then hostBusybox
    else if system == "aarch64-linux" then arm64Busybox
    else throw ("nix/demo: no packages for system '${system}': only for this "
      + "machine's (${hostSystem}) and aarch64-linux");
  bb = "${busybox}/bin/busybox";

  # A package that needs no build step (see store-import.nix).
  storeImport = import ./store-import.nix;

  # A derivation built here by the host's busybox sh running `script`, for
  # any `system`. Extra attributes reach the script as environment
  # variables, so data never becomes shell code. The script runs the host's
  # binary and must not run `bb`, which may be another machine's.
  runBusybox = { name, script, ... }@attrs:
    derivation (builtins.removeAttrs attrs [ "script" ] // {
      system = hostSystem;
      builder = hostBb;
      args = [ "sh" "-eu" "-c" script ];
    });

  # A package made of executable scripts under bin/ and of symlinks.
  #   scripts: bin name -> script body (busybox sh; the shebang is added here)
  #   links:   path inside the output -> symlink target
  # Scripts call busybox by its store path rather than relying on applets
  # found by name: those re-exec through /proc/self/exe, which a bare chroot
  # does not have.
  mkPackage = { name, scripts ? { }, links ? { }, mainProgram ? null }:
    let
      scriptNames = builtins.attrNames scripts;
      linkPaths = builtins.attrNames links;
      # script0, script1, ... in the order of scriptNames.
      scriptVars = builtins.listToAttrs (builtins.genList
        (i: {
          name = "script${toString i}";
          value = "#!${bb} sh\n" + scripts.${builtins.elemAt scriptNames i};
        })
        (builtins.length scriptNames));
    in
    withMeta mainProgram (runBusybox (scriptVars // {
      inherit name;
      scriptNames = builtins.concatStringsSep " " scriptNames;
      links = builtins.concatStringsSep " "
        (builtins.concatMap (path: [ path links.${path} ]) linkPaths);
      script = ''
        mkdir -p "$out"
        i=0
        for bin in $scriptNames; do
          mkdir -p "$out/bin"
          awk -v var="script$i" 'BEGIN { printf "%s", ENVIRON[var] }' > "$out/bin/$bin"
          chmod 0555 "$out/bin/$bin"
          i=$((i + 1))
        done
        set -- $links
        while [ $# -gt 0 ]; do
          mkdir -p "$(dirname "$out/$1")"
          ln -s "$2" "$out/$1"
          shift 2
        done
      '';
    }));

  # A derivation with meta.mainProgram, on its `out` too, as nixpkgs' have it.
  withMeta = mainProgram: drv:
    if mainProgram == null then drv
    else let self = drv // { meta.mainProgram = mainProgram; out = self; }; in self;

  # A directory committed next to this file, copied into the store with no
  # build step: it exists for every system without building anything.
  importFiles = name: storeImport name (builtins.path { inherit name; path = ./files + "/${name}"; });

  # Links named like busybox applets, pointing at busybox.
  appletLinks = applets: builtins.listToAttrs
    (map (applet: { name = "bin/${applet}"; value = bb; }) applets);

  # A script that runs other packages' binaries, then says its own name.
  runsThenEchoes = name: programs: {
    inherit name;
    scripts.${name} = builtins.concatStringsSep "" (map (p: "${p}\n") programs)
      + "${bb} echo ${name}\n";
  };

  diamond-base = mkPackage (runsThenEchoes "diamond-base" [ ]);
  diamond-left = mkPackage (runsThenEchoes "diamond-left" [ "${diamond-base}/bin/diamond-base" ]);
  diamond-right = mkPackage (runsThenEchoes "diamond-right" [ "${diamond-base}/bin/diamond-base" ]);
  diamond-top = mkPackage (runsThenEchoes "diamond-top" [
    "${diamond-left}/bin/diamond-left"
    "${diamond-right}/bin/diamond-right"
  ]);

  chain-c = mkPackage (runsThenEchoes "chain-c" [ ]);
  chain-b = mkPackage (runsThenEchoes "chain-b" [ "${chain-c}/bin/chain-c" ]);
  chain-a = mkPackage (runsThenEchoes "chain-a" [ "${chain-b}/bin/chain-b" ]);

  # For tests of concurrent, cancelled and timed-out builds. A test copies
  # this set and writes ./test-nonce so that Nix has to build these afresh;
  # the nonce reaches the builder as $NONCE, so a test can also find its
  # processes.
  nonce = if builtins.pathExists ./test-nonce then builtins.readFile ./test-nonce else "";
in
{
  inherit busybox;

  hello = mkPackage {
    name = "hello";
    scripts.hello = "${bb} echo 'Hello, world!'\n";
    mainProgram = "hello";
  };

  # Debian's busybox has no bash applet, so bash is ash under another name.
  bashInteractive = mkPackage {
    name = "bash-interactive";
    scripts.bash = ''exec ${bb} sh "$@"'' + "\n";
    links."bin/sh" = bb;
  };

  coreutils = mkPackage {
    name = "coreutils";
    links = appletLinks [
      "basename" "cat" "chmod" "chown" "cp" "cut" "date" "dd" "df" "dirname"
      "du" "echo" "env" "expr" "false" "head" "id" "ln" "ls" "mkdir" "mktemp"
      "mv" "nproc" "printf" "pwd" "readlink" "realpath" "rm" "rmdir" "seq"
      "sleep" "sort" "stat" "tail" "tee" "touch" "tr" "true" "uname" "uniq"
      "wc" "whoami" "yes"
    ];
  };

  moreutils = mkPackage {
    name = "moreutils";
    # sponge [FILE]: soak up all of standard input, then write it out.
    scripts.sponge = ''
      set -e
      soaked=$(${bb} mktemp)
      ${bb} cat > "$soaked"
      if [ $# -gt 0 ]; then ${bb} cat "$soaked" > "$1"; else ${bb} cat "$soaked"; fi
      ${bb} rm -f "$soaked"
    '';
    links = appletLinks [ "ts" ];
  };

  nano = mkPackage {
    name = "nano";
    scripts.nano = ''exec ${bb} vi "$@"'' + "\n";
  };

  cacert = importFiles "cacert";
  iana-etc = importFiles "iana-etc";
  docs = importFiles "docs";

  inherit diamond-base diamond-left diamond-right diamond-top;
  inherit chain-a chain-b chain-c;

  # Reached as `tools.greet`; `tools` itself is not a package.
  tools = {
    greet = mkPackage {
      name = "greet";
      mainProgram = "greet";
      scripts.greet = ''${bb} echo "Greetings, ''${1:-stranger}!"'' + "\n";
    };
  };

  # Registry names are lowercase: `camelcase` must find this.
  camelCase = mkPackage {
    name = "camel-case";
    scripts.camel-case = "${bb} echo camelCase\n";
  };

  # An attribute name cannot start with a digit, so nixpkgs prefixes `_`;
  # the image name `1password` must find this.
  _1password = mkPackage {
    name = "1password";
    scripts."1password" = "${bb} echo '1password stand-in'\n";
  };

  # About 55 MB (52 for aarch64): 28 copies of the payload busybox, each
  # behind its own header line so no two files are equal. Built, not
  # imported, so that nothing is read or hashed until an image asks for it,
  # and so that it is the same on every machine that has the same busybox.
  large = runBusybox {
    name = "large";
    script = ''
      mkdir -p "$out/share/large"
      i=0
      while [ $i -lt 28 ]; do
        { echo "large demo blob $i"; cat ${bb}; } > "$out/share/large/blob-$i.bin"
        i=$((i + 1))
      done
    '';
  };

  broken = runBusybox {
    name = "broken";
    script = ''
      echo "broken: this demo package fails to build on purpose" >&2
      exit 1
    '';
  };

  # Takes two seconds to build.
  slow = runBusybox {
    name = "slow";
    NONCE = nonce;
    script = ''
      ${hostBb} sleep 2
      ${hostBb} mkdir -p "$out/bin"
      ${hostBb} printf '#!%s sh\n%s echo slow %s\n' ${bb} ${bb} "$NONCE" > "$out/bin/slow"
      ${hostBb} chmod +x "$out/bin/slow"
    '';
  };

  # Never finishes: only NIX_TIMEOUT ends it.
  hang = runBusybox {
    name = "hang";
    NONCE = nonce;
    script = "exec ${hostBb} sleep 86400";
  };

  # Like a nixpkgs alias of a removed package: evaluating it throws.
  removed = throw "removed: this demo package has been removed";
}
