"""gitignore syntax for what `submit` leaves out (.applianceignore, .gitignore)."""

from __future__ import annotations

import pytest

from appliance.ignore import ignored, parse


@pytest.mark.parametrize("lines, path, is_dir, expected", [
    ("*.ckpt", "model.ckpt", False, True),
    ("*.ckpt", "runs/a/model.ckpt", False, True),
    ("*.ckpt", "model.ckpt.txt", False, False),
    ("data/", "data", True, True),
    ("data/", "data", False, False),          # a file called data is not the folder
    ("data/", "sub/data", True, True),        # no inner slash: any depth
    ("/data", "sub/data", True, False),       # anchored
    ("/data", "data", True, True),
    ("runs/*.log", "runs/x.log", False, True),
    ("runs/*.log", "a/runs/x.log", False, False),  # inner slash: anchored
    ("**/cache", "a/b/cache", True, True),
    ("**/cache", "cache", True, True),
    ("logs/**", "logs/a/b.txt", False, True),
    ("a/**/z", "a/z", False, True),
    ("a/**/z", "a/b/c/z", False, True),
    ("file?.txt", "file1.txt", False, True),
    ("file?.txt", "file10.txt", False, False),
    ("[abc].py", "b.py", False, True),
    ("[!abc].py", "b.py", False, False),
    ("*.bin\n!keep.bin", "keep.bin", False, False),
    ("*.bin\n!keep.bin", "other.bin", False, True),
    ("!keep.bin\n*.bin", "keep.bin", False, True),  # the last match wins
    ("# comment\n\n", "# comment", False, False),
    ("\\#hash", "#hash", False, True),
    ("trailing   ", "trailing", False, True),
])
def test_patterns(lines, path, is_dir, expected):
    assert ignored(parse(lines), path, is_dir) is expected


def test_a_nested_file_applies_below_its_folder_only():
    rules = parse("*.csv") + parse("!small.csv", base="data")  # a deeper file wins
    assert ignored(rules, "data/big.csv", False) and ignored(rules, "small.csv", False)
    assert not ignored(rules, "data/small.csv", False)
    rules = parse("*.tmp", base="data")
    assert ignored(rules, "data/x.tmp", False)
    assert not ignored(rules, "x.tmp", False)
    assert ignored(parse("/x.tmp", base="data"), "data/x.tmp", False)
    assert not ignored(parse("/x.tmp", base="data"), "data/sub/x.tmp", False)
