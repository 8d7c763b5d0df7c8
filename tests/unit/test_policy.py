import pytest

from nixery_trio.core.errors import Denied
from nixery_trio.core.htpasswd import parse_htpasswd
from nixery_trio.core.policy import PackagePolicy

BCRYPT = "$2b$10$" + "a" * 53


def test_no_lists_allow_everything() -> None:
    assert PackagePolicy().refusal(("anything", "at-all")) is None


def test_an_allow_list_refuses_what_it_does_not_match() -> None:
    policy = PackagePolicy(allow=("git", "python3*"))
    assert policy.refusal(("git", "python312")) is None
    refusal = policy.refusal(("git", "htop"))
    assert isinstance(refusal, Denied) and refusal.status == 403 and refusal.code == "DENIED"
    assert "'htop'" in refusal.message and refusal.detail["package"] == "htop"


def test_deny_wins_over_allow_and_names_the_pattern() -> None:
    policy = PackagePolicy(allow=("*",), deny=("cow*", "sl"))
    refusal = policy.refusal(("hello", "cowsay"))
    assert refusal is not None and refusal.detail == {"package": "cowsay", "deny": "cow*"}
    assert policy.refusal(("slack",)) is None  # globs match whole names
    assert policy.refusal(("Cowsay",)) is None  # Nix attribute names are case-sensitive


def test_a_remembered_verdict_is_a_fresh_error_each_time() -> None:
    policy = PackagePolicy(deny=("htop",))
    first, second = policy.refusal(("htop",)), policy.refusal(("htop",))
    assert first is not None and second is not None and first is not second
    assert first.message == second.message


def test_htpasswd_takes_bcrypt_users_and_skips_comments() -> None:
    users = parse_htpasswd(f"# team\n\nalice:{BCRYPT}\nbob:{BCRYPT.replace('2b', '2y')}\n")
    assert set(users) == {"alice", "bob"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no user"),
        ("# nobody\n", "holds no user"),
        ("alice\n", "line 1 is not user:hash"),
        (f"alice:{BCRYPT}\nbob:$apr1$xyz$abcdefghijklmnopqrstuv\n",
         r"line 2 \(bob\): not a bcrypt"),
        ("carol:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n", "htpasswd -B"),
        ("dave:plaintext\n", "not a bcrypt"),
    ],
)
def test_htpasswd_refuses_weak_or_broken_lines(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_htpasswd(text)
