"""Atomic writes: the background write used while a backend builds from memory."""

from __future__ import annotations

import os

import pytest

from amp_search._atomic import BackgroundWrite
from amp_search.errors import UserInputError


def test_background_write_puts_the_chunks_in_place(tmp_path):
    chunks = [os.urandom(1 << 20), b"", os.urandom(12345)]
    path = tmp_path / "c" / "model.onnx"
    writing = BackgroundWrite(path, chunks)
    assert writing.wait() == path
    assert path.read_bytes() == b"".join(chunks)
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no temp file left


def test_background_write_error_is_raised_by_wait(tmp_path):
    blocker = tmp_path / "candidates"
    blocker.write_text("a file where a folder should be")
    writing = BackgroundWrite(blocker / "abc" / "model.onnx", [b"x"])
    with pytest.raises(UserInputError, match="is a file, not a folder"):
        writing.wait()
