"""The name rules both sides rely on: a plain file name stays in its folder, whatever the text."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given, strategies as st

from pum.common.model_files import MAX_NAME_BYTES, PUBLIC_FILES, is_plain_file_name, is_task_name

PIECES = st.sampled_from(list("ab.-_+/\\\x00~é ") + ["..", "/..", "../", "config.json"])
NAMEISH = st.lists(PIECES, max_size=12).map("".join)


@given(st.one_of(NAMEISH, st.text(max_size=300)))
def test_a_plain_file_name_is_a_visible_direct_child_of_its_folder(name):
    if not is_plain_file_name(name):
        return
    base = Path("/srv/folder")
    joined = Path(os.path.normpath(base / name))
    assert joined.parent == base and joined.name == name and not name.startswith(".")
    assert "\x00" not in name and len(name.encode()) <= MAX_NAME_BYTES


@given(st.one_of(NAMEISH, st.text(max_size=120)))
def test_a_task_name_is_one_folder_below_the_saves_folder(name):
    if is_task_name(name):
        assert Path(os.path.normpath(Path("/saves") / name)).parent == Path("/saves") and not name.startswith(".")


def test_every_public_file_name_is_plain():
    assert all(is_plain_file_name(name) for name in PUBLIC_FILES)
    assert not any(name.endswith((".py", ".bin", ".pt", ".pth", ".pkl", ".safetensors")) for name in PUBLIC_FILES)
