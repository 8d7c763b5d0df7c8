# Finds packages in a package set by the names an image asks for.
#
# Image names come from registry paths, which are lowercase and cannot say
# everything a Nix attribute path can, so a name is looked up leniently:
#
#   - dots separate nested attributes:
#       haskellpackages.stylish-haskell -> pkgs.haskellPackages.stylish-haskell
#   - each component is looked up by its exact name first, then by a
#     case-insensitive match among the set's attribute names:
#       bashinteractive -> bashInteractive
#   - a component starting with a digit, which is no valid attribute name in
#     nixpkgs, is also tried with a `_` prefix:
#       1password -> _1password
#   - what the whole path reaches must be a derivation (`type == "derivation"`,
#     as nixpkgs' lib.isDerivation says); anything else, or a value that throws
#     when evaluated (a removed package's alias), is not found.
#
# The search reads attribute names only: no other attribute's value is
# evaluated, which matters in a package set as large as nixpkgs.
let
  upperCase = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lowerCase = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  toLower = builtins.replaceStrings upperCase lowerCase;

  splitDots = name: builtins.filter builtins.isString (builtins.split "\\." name);

  startsWithDigit = name: builtins.match "[0-9].*" name != null;

  # Whether `predicate value` holds; false when evaluating it throws.
  holds = predicate: value:
    let tried = builtins.tryEval (predicate value);
    in tried.success && tried.value;

  isDerivation = value: (value.type or null) == "derivation";

  # The attribute names of `set` that `wanted` refers to, best first.
  namesFor = set: wanted:
    let
      caseInsensitive = builtins.filter
        (name: toLower name == toLower wanted)
        (builtins.attrNames set);
    in
    if builtins.hasAttr wanted set then [ wanted ] else caseInsensitive;

  # The attribute of `set` that one name component refers to, or null.
  findAttr = set: component:
    let
      candidates = namesFor set component
        ++ (if startsWithDigit component then namesFor set ("_" + component) else [ ]);
    in
    if candidates == [ ] then null else builtins.head candidates;

  # Follows the components of a dotted name from `set`. Gives `{ value }`, or
  # null when a component is missing or a value on the way is no attribute
  # set. The value is wrapped so that passing it along never evaluates it:
  # only `holds` does, where a throw is caught.
  walk = set: components:
    builtins.foldl'
      (current: component:
        if current == null || !(holds builtins.isAttrs current.value) then null
        else
          let attr = findAttr current.value component;
          in if attr == null then null else { value = current.value.${attr}; })
      { value = set; }
      components;
in
{
  inherit toLower splitDots;

  # The derivation that `name` refers to in `pkgs`, or null.
  findPackage = pkgs: name:
    let found = walk pkgs (splitDots name);
    in if found != null && holds isDerivation found.value then found.value else null;
}
