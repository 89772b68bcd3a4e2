"""Dictionary/target entries: NAME=DIR forms, default names, unique names, array-file detection."""

from pathlib import Path

import pytest

from unmerge_jax import UnmergeError
from unmerge_jax.entries import Entry, is_array_file, parse_entries, split_spec


def test_entry_forms(tmp_path):
    got = parse_entries(["./models/ft-math", "code=./lora/code", ("chat", tmp_path / "c"), Entry("x", Path("y"))])
    assert [(e.name, str(e.path)) for e in got] == [("ft-math", "models/ft-math"), ("code", "lora/code"),
                                                   ("chat", str(tmp_path / "c")), ("x", "y")]
    assert [e.name for e in parse_entries({"a": "p", "b": "q"})] == ["a", "b"]
    assert split_spec(".")[0] == Path.cwd().name


def test_existing_path_with_equals_sign_is_a_path(tmp_path):
    odd = tmp_path / "lr=1e-4"
    odd.mkdir()
    assert split_spec(str(odd)) == ("lr=1e-4", odd)
    assert split_spec("lr=1e-4") == ("lr", Path("1e-4"))  # no such path: NAME=DIR


def test_bad_entries_are_one_line_errors():
    with pytest.raises(UnmergeError, match="the dictionary is empty"):
        parse_entries([])
    with pytest.raises(UnmergeError, match="the targets is empty"):
        parse_entries(None, "targets")
    with pytest.raises(UnmergeError, match="two dictionary entries are named 'ft'"):
        parse_entries(["a/ft", "b/ft"])
    with pytest.raises(UnmergeError, match="empty name"):
        parse_entries([("", "dir")])


def test_array_files_are_told_from_directories(tmp_path):
    (tmp_path / "D.npy").touch()
    (tmp_path / "model.safetensors").mkdir()  # a directory named like a file is not an array file
    assert is_array_file(str(tmp_path / "D.npy")) and is_array_file(f"d={tmp_path / 'D.npy'}")
    assert is_array_file(("d", tmp_path / "V.safetensors"))
    assert not is_array_file(str(tmp_path / "model.safetensors")) and not is_array_file(str(tmp_path))
