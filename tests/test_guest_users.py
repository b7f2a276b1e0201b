"""The guest agent's user lookups against an image's /etc/passwd and /etc/group."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kelpie.guest._common import OpError
from kelpie.guest._rootfs import RootFS, lookup_user

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
# a comment
broken:x:notanumber:0::/:/bin/sh
bob:x:1234:1234::/home/bob:/bin/sh
bob:x:999:999::/elsewhere:/bin/sh
same-uid:x:1234:50::/other:/bin/sh
nohome:x:77:77:::/bin/sh
"""
GROUP = """\
root:x:0:
wheel:x:10:bob,alice
staff:x:50:bob,bob
bad:x:nan:bob
staff:x:51:bob
short:x
"""


@pytest.fixture
def image(tmp_path: Path) -> RootFS:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text(PASSWD)
    (tmp_path / "etc" / "group").write_text(GROUP)
    return RootFS(str(tmp_path))


def test_a_name_or_uid_finds_the_first_valid_row(image: RootFS) -> None:
    bob = lookup_user(image, "bob")
    assert (bob.name, bob.uid, bob.gid, bob.home) == ("bob", 1234, 1234, "/home/bob")
    by_uid = lookup_user(image, 1234)
    assert by_uid.name == "bob"
    assert lookup_user(image, "1234").name == "bob"
    assert lookup_user(image, "nohome").home == "/"


def test_supplementary_groups_come_from_group_members_once_each(image: RootFS) -> None:
    assert lookup_user(image, "bob").groups == [1234, 10, 50, 51]
    assert lookup_user(image, "root").groups == [0]
    assert lookup_user(image, "bob", groups=False).groups == [1234]  # /etc/group unread


def test_user_colon_group_makes_that_the_only_group(image: RootFS) -> None:
    user = lookup_user(image, "bob:staff")
    assert (user.uid, user.gid, user.groups) == (1234, 50, [50])
    assert lookup_user(image, "bob:4242").groups == [4242]
    with pytest.raises(OpError, match="no group named 'nope'"):
        lookup_user(image, "bob:nope")


def test_unknown_names_are_refused_and_unknown_uids_run_as_themselves(image: RootFS) -> None:
    with pytest.raises(OpError, match="no user named 'broken'"):
        lookup_user(image, "broken")
    stranger = lookup_user(image, 4321)
    assert (stranger.name, stranger.uid, stranger.gid, stranger.groups) == ("4321", 4321, 4321,
                                                                            [4321])


def test_an_edited_database_is_read_again(image: RootFS) -> None:
    assert lookup_user(image, "bob").groups == [1234, 10, 50, 51]
    group = Path(image.root) / "etc" / "group"
    group.write_text("wheel:x:10:alice\n")
    assert lookup_user(image, "bob").groups == [1234]
    passwd = Path(image.root) / "etc" / "passwd"
    replaced = passwd.with_name("passwd.new")
    replaced.write_text("carol:x:5:5::/c:/bin/sh\n")
    os.replace(replaced, passwd)  # a new inode, as useradd leaves it
    assert lookup_user(image, "carol").uid == 5
    with pytest.raises(OpError, match="no user named 'bob'"):
        lookup_user(image, "bob")


def test_an_image_without_databases_knows_only_uids(tmp_path: Path) -> None:
    empty = RootFS(str(tmp_path))
    assert lookup_user(empty, 0).name == "0"
    with pytest.raises(OpError, match="no user named 'root'"):
        lookup_user(empty, "root")
