"""Atomic output: whole file or the previous one, never half; no temp files left behind."""

import json
import os

import pytest

from hetune.files import open_atomic, save_figure, write_atomic, write_json


def test_write_json_replaces_whole_and_is_readable(tmp_path):
    path = tmp_path / "sub" / "m.json"
    write_json(path, {"a": 1, "p": tmp_path})
    assert json.loads(path.read_text()) == {"a": 1, "p": str(tmp_path)}
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert os.listdir(path.parent) == ["m.json"]


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path):
    path = write_atomic(tmp_path / "r.json", "old")
    with pytest.raises(TypeError):
        write_atomic(path, 12345)  # not bytes/str: fails after the temp file exists
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]


def test_secret_mode_and_figure(tmp_path):
    key = write_atomic(tmp_path / "k", b"\x00\x01", mode=0o600)
    assert key.stat().st_mode & 0o777 == 0o600
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = save_figure(fig, tmp_path / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sorted(os.listdir(tmp_path)) == ["f.png", "k"]


def test_a_file_written_in_pieces_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "hint"
    with open_atomic(target, mode=0o600) as (fh, tmp):
        fh.write(b"one")
        assert not target.exists() and tmp.parent == target.parent
        fh.write(b"two")
    assert target.read_bytes() == b"onetwo" and (target.stat().st_mode & 0o777) == 0o600
    with pytest.raises(ValueError):
        with open_atomic(target) as (fh, _):
            fh.write(b"half")
            raise ValueError("download cut")
    assert target.read_bytes() == b"onetwo" and os.listdir(target.parent) == ["hint"]
