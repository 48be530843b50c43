"""A GGUF file's key/value metadata, read straight from the header (gguf.GGUFReader also maps every
tensor and decodes every array: ~8 s on a 150k-token vocabulary, where this takes well under one)."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: str | Path, *, arrays: bool = True) -> dict[str, object]:
    """The metadata of the GGUF at `path`; with `arrays=False` array values are skipped (None).

    Raises ValueError for a file that is not a readable GGUF (wrong magic, truncated, malformed).
    """
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                return _Header(data, arrays).metadata()
            except (struct.error, IndexError, KeyError, UnicodeDecodeError, OverflowError, MemoryError) as error:
                raise ValueError(f"{path} has malformed GGUF metadata ({type(error).__name__}: {error})") from None


class _Header:
    """A cursor over the key/value section that follows magic, version, tensor count and key count."""

    def __init__(self, data: mmap.mmap, arrays: bool):
        self._data, self._arrays, self._offset = data, arrays, 24

    def metadata(self) -> dict[str, object]:
        (count,) = struct.unpack_from("<Q", self._data, 16)
        result: dict[str, object] = {}
        for _ in range(count):
            key = self._string()
            result[key] = self._value(self._unpack("<I"))
        return result

    def _unpack(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self._data, self._offset)
        self._offset += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        length = self._unpack("<Q")
        end = self._offset + length
        if end > len(self._data):
            raise IndexError("string runs past the end of the file")
        text = self._data[self._offset:end].decode("utf-8")
        self._offset = end
        return text

    def _value(self, kind: int) -> object:
        if kind == _STRING:
            return self._string()
        if kind != _ARRAY:
            return self._unpack(_SCALARS[kind])
        item, count = self._unpack("<I"), self._unpack("<Q")
        if item in _SCALARS:
            size = struct.calcsize(_SCALARS[item]) * count
            start, self._offset = self._offset, self._offset + size
            if self._offset > len(self._data):
                raise IndexError("array runs past the end of the file")
            return np.frombuffer(self._data[start:self._offset], np.dtype(_SCALARS[item])).tolist() if self._arrays else None
        values = [self._value(item) for _ in range(count)]
        return values if self._arrays else None
