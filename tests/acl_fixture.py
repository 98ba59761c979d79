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
