"""utils/io.py: atomic writes leave the old file or the complete new one, and no temporary file."""

import hashlib
import json
import os

import pytest

from part_distillation.utils.io import (
    HashingFile,
    atomic_file,
    atomic_write_bytes,
    atomic_write_json,
    canonical_json,
    read_json,
    sha256_file,
)


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = str(tmp_path / "out.bin")
    atomic_write_bytes(path, b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(path) as f:
            f.write(b"half of the new")
            raise KeyboardInterrupt
    assert open(path, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_json_round_trip_and_canonical_text(tmp_path):
    value = {"b": [{"y": 2, "x": 1}, {"x": 3}], "a": "é"}
    for compact in (True, False):
        path = str(tmp_path / f"v{compact}.json")
        atomic_write_json(path, value, compact=compact)
        assert read_json(path) == value
    assert open(tmp_path / "vTrue.json", encoding="utf-8").read() == canonical_json(value) + "\n"
    assert canonical_json(value) == '{"a":"é","b":[{"x":1,"y":2},{"x":3}]}'
    with pytest.raises(ValueError):
        canonical_json({"nan": float("nan")})
    assert json.loads(open(tmp_path / "vFalse.json", encoding="utf-8").read()) == value


def test_hashing_file_and_sha256_file_agree(tmp_path):
    path = str(tmp_path / "h.bin")
    with atomic_file(path) as f:
        hashing = HashingFile(f)
        hashing.write(b"abc")
        hashing.write(b"defg")
    assert hashing.bytes == 7
    assert hashing.sha256.hexdigest() == sha256_file(path) == hashlib.sha256(b"abcdefg").hexdigest()


def test_read_user_json_is_one_line_naming_the_key_for_every_unreadable_file(tmp_path):
    from part_distillation.utils.errors import ConfigError
    from part_distillation.utils.io import read_user_json

    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2]}')
    assert read_user_json(str(good), "TEST.KEY") == {"a": [1, 2]}
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    truncated = tmp_path / "truncated.json"
    truncated.write_text('{"a": [1, ')
    for path, message in (
        (tmp_path / "missing.json", "does not exist"),
        (tmp_path, "is a folder"),
        (binary, "not valid UTF-8 JSON"),
        (truncated, "not valid UTF-8 JSON"),
    ):
        with pytest.raises(ConfigError, match=message) as e:
            read_user_json(str(path), "TEST.KEY")
        assert str(e.value).startswith(f"TEST.KEY={str(path)!r}") and "\n" not in str(e.value)
