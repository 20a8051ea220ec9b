"""Reading GGUF files (llama.cpp's format): the metadata and the tensor directory, parsed
here (GGUF v2/v3, little-endian); tensor data stays memory-mapped and is dequantized to
float32 by the `gguf` package one tensor at a time. pretrained/convert.py maps the tensors onto
our param tree; hh_jax.tokenizer builds the BPE tokenizer from the metadata.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import struct

import numpy as np

# The header is parsed here rather than by gguf.GGUFReader, which builds a numpy view per
# string of the vocabulary (slow on a 49k-token vocabulary; BENCHMARKS.md has the times).
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
           12: "d"}


@dataclasses.dataclass
class GGUFFile:
    path: str
    metadata: dict
    tensors: dict  # name → (ggml type, numpy shape, absolute byte offset)
    _buf: mmap.mmap

    def tensor(self, name: str) -> np.ndarray:
        """The named tensor dequantized to float32, numpy shape (ggml dims reversed)."""
        from gguf import GGMLQuantizationType, quants

        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        qtype, shape, offset = self.tensors[name]
        rows, row_bytes = math.prod(shape[:-1]), _nbytes(qtype, shape[-1:])
        raw = np.frombuffer(self._buf, np.uint8, rows * row_bytes, offset)
        return quants.dequantize(raw.reshape(rows, row_bytes),
                                 GGMLQuantizationType(qtype)).reshape(shape)


def _read_value(buf, pos: int, vtype: int):
    if vtype == 8:  # string
        (n,) = struct.unpack_from("<Q", buf, pos)
        return bytes(buf[pos + 8: pos + 8 + n]).decode("utf-8", "replace"), pos + 8 + n
    if vtype == 9:  # array: item type, count, items
        itype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if itype in _SCALAR:  # numeric arrays in one read
            dtype = np.dtype("<" + _SCALAR[itype].replace("?", "b1"))
            arr = np.frombuffer(buf, dtype, count, pos)
            return arr.tolist(), pos + count * dtype.itemsize
        items = []
        for _ in range(count):
            item, pos = _read_value(buf, pos, itype)
            items.append(item)
        return items, pos
    fmt = "<" + _SCALAR[vtype]
    return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)


def read_gguf(path: str) -> GGUFFile:
    """Metadata and tensor directory of a GGUF file; tensor data stays memory-mapped."""
    with open(path, "rb") as f:
        head = f.read(4)
        if head != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (starts with {head!r})")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        meta, tensors = _parse(buf, path)
    except (struct.error, KeyError, IndexError) as e:  # a cut-off or corrupt header
        raise ValueError(f"{path}: corrupt or truncated GGUF header ({e!r})") from None
    end = max((off + _nbytes(q, shape) for q, shape, off in tensors.values()), default=0)
    if end > len(buf):
        raise ValueError(f"{path}: truncated: tensor data ends at byte {end}, "
                         f"the file has {len(buf)}")
    return GGUFFile(str(path), meta, tensors, buf)


def _nbytes(qtype: int, shape: tuple[int, ...]) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    return math.prod(shape) // block * type_size


def _parse(buf, path: str) -> tuple[dict, dict]:
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} unsupported (2 or 3, little-endian)")
    pos, meta, infos = 24, {}, []
    for _ in range(n_kv):
        key, pos = _read_value(buf, pos, 8)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        meta[key], pos = _read_value(buf, pos + 4, vtype)
    for _ in range(n_tensors):
        name, pos = _read_value(buf, pos, 8)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, qtype, tuple(reversed(dims)), offset))
    align = int(meta.get("general.alignment", 32))
    start = (pos + align - 1) // align * align
    return meta, {name: (qtype, shape, start + off) for name, qtype, shape, off in infos}
