"""A default POSIX ACL on a test folder, as a shared project folder on a cluster has."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest


def with_default_acl(folder: Path, other: int) -> None:
    """Give ``folder`` a default POSIX ACL (what ``setfacl -d`` sets on a shared project
    folder): owner and group rwx, others ``other``. Under it a new file's permissions come
    from the ACL, not from the umask."""
    entries = ((0x01, 0o7), (0x04, 0o7), (0x20, other))  # user::, group::, other::
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, permissions, 0xFFFFFFFF)
                                          for tag, permissions in entries)
    try:
        os.setxattr(folder, "system.posix_acl_default", acl)
    except (AttributeError, OSError) as error:
        pytest.skip(f"no POSIX ACLs on {folder}: {error}")


def shared_folder(parent: Path, acl: bool) -> tuple[Path, int]:
    """A folder ``parent/shared``, with a default ACL (group rwx, others nothing) when
    ``acl``, and the mode a folder made in it with a plain ``mkdir`` gets (0770 under the
    ACL, 0777 less the umask without): what a folder a step writes there must get."""
    import stat

    folder = parent / "shared"
    folder.mkdir()
    if acl:
        with_default_acl(folder, other=0)
    (folder / "plain").mkdir()
    expected = stat.S_IMODE((folder / "plain").stat().st_mode)
    assert not acl or expected == 0o770
    return folder, expected
