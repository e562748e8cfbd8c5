"""Streaming safetensors: write and read model-sized files one tensor at a time.

The format (https://github.com/huggingface/safetensors):

    [8 bytes]  N, the header length, unsigned little-endian
    [N bytes]  UTF-8 JSON: {name: {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]},
               ..., "__metadata__": {str: str}}, padded with spaces so that 8 + N is a multiple of 8
    [body]     the tensors' raw little-endian bytes; offsets count from the body's first byte, and
               sorted by offset the tensors lie back to back from 0 to the end of the file

Memory guarantee: nothing here holds a whole file. `stream_safetensors` holds one tensor at a
time and yields it in chunks of at most 1 MiB; `StreamParser` holds the header, then one tensor
(written straight into a fresh tensor's memory) plus the chunk being fed; `SafetensorsFile` reads
with seek/readinto, never mmap, so the pages of a large file do not count in the process's RSS.

Everything a peer sends is validated by `parse_header` (shared by the parser and the file reader)
and refused with `InvalidInput` or `PayloadTooLarge` saying what to change, never with tensor
values. A server reading a peer's stream must pass `max_total_bytes`.
"""

from __future__ import annotations

import contextlib
import json
import math
import reprlib
import os
import sys
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import BinaryIO
from dataclasses import dataclass

import torch

from pum.common.errors import InvalidInput, PayloadTooLarge

if sys.byteorder != "little":  # the body is little-endian and is copied to and from memory as is
    raise ImportError("pum.common.codec needs a little-endian machine")

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 16 * 2**20
CHUNK_BYTES = 2**20
_METADATA = "__metadata__"
_ENTRY_KEYS = ("dtype", "shape", "data_offsets")


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype ("F32" for torch.float32)."""
    if dtype not in _NAMES:
        raise ValueError(f"dtype {dtype} is not supported; convert to one of {[str(d) for d in _NAMES]}")
    return _NAMES[dtype]


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's name, safetensors dtype and shape; validated on construction."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if isinstance(self.shape, list):
            object.__setattr__(self, "shape", tuple(self.shape))
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise InvalidInput(f"tensor {self.name!r}: dtype {reprlib.repr(self.dtype)} is not supported; use one of {list(DTYPES)}")
        if not isinstance(self.shape, tuple) or not all(_is_uint(n) for n in self.shape):
            raise InvalidInput(f"tensor {self.name!r}: shape must be a list of non-negative integers (got {reprlib.repr(self.shape)})")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorInfo:
        return cls(name, dtype_name(tensor.dtype), tuple(tensor.shape))

    def describe(self) -> str:
        return f"{self.dtype} {list(self.shape)}"


# --- header -------------------------------------------------------------------------------------

def layout(infos: list[TensorInfo]) -> dict[str, tuple[int, int]]:
    """Body offsets (begin, end) of each tensor, laid out back to back in the order given."""
    offsets, position = {}, 0
    for info in infos:
        offsets[info.name] = (position, position + info.nbytes)
        position += info.nbytes
    return offsets


def _check_metadata(metadata: object) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InvalidInput(f"{_METADATA} must be an object mapping strings to strings; drop or stringify other values")
    return metadata


def build_header(infos: list[TensorInfo], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length prefix plus the space-padded JSON header for `infos`, in order."""
    names = [info.name for info in infos]
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates or _METADATA in names:
        raise ValueError(f"tensor names must be unique and not {_METADATA!r}; rename {duplicates or [_METADATA]}")
    header: dict[str, object] = {_METADATA: _check_metadata(metadata)} if metadata else {}
    for info, (begin, end) in zip(infos, layout(infos).values()):
        header[info.name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def total_size(infos: list[TensorInfo], metadata: dict[str, str] | None = None) -> int:
    """The size in bytes of the whole file: prefix, header and body."""
    return len(build_header(infos, metadata)) + sum(info.nbytes for info in infos)


def header_length(prefix: bytes, max_header_bytes: int = MAX_HEADER_BYTES) -> int:
    """N from the 8-byte prefix; refuses a header over `max_header_bytes`."""
    length = int.from_bytes(prefix[:8], "little")
    if length > max_header_bytes:
        raise InvalidInput(f"the header declares {length} bytes, over the limit of {max_header_bytes}: "
                           "send a safetensors file (with fewer tensors if it really is one)")
    return length


def _entry(name: str, value: object) -> tuple[TensorInfo, tuple[int, int]]:
    if not isinstance(value, dict) or not all(key in value for key in _ENTRY_KEYS):
        missing = [k for k in _ENTRY_KEYS if not isinstance(value, dict) or k not in value]
        raise InvalidInput(f"header entry {name!r} must be an object with keys {list(_ENTRY_KEYS)} (missing {missing})")
    info = TensorInfo(name, value["dtype"], value["shape"])
    offsets = value["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_uint, offsets)) and offsets[0] <= offsets[1]):
        raise InvalidInput(f"tensor {name!r}: data_offsets must be [begin, end], integers with 0 <= begin <= end")
    if offsets[1] - offsets[0] != info.nbytes:
        raise InvalidInput(f"tensor {name!r}: data_offsets span {offsets[1] - offsets[0]} bytes but "
                           f"{info.describe()} needs {info.nbytes}; fix the offsets or the shape")
    return info, (offsets[0], offsets[1])


def parse_header(raw: bytes) -> tuple[list[TensorInfo], dict[str, str], int]:
    """Validate the JSON header; return its tensors in file order, its metadata and the body size."""
    try:
        header = json.loads(bytes(raw).decode("utf-8"))
    except (ValueError, RecursionError) as err:
        raise InvalidInput(f"the header is not valid UTF-8 JSON ({type(err).__name__}); send a safetensors file") from None
    if not isinstance(header, dict):
        raise InvalidInput(f"the header must be a JSON object (got {type(header).__name__}); send a safetensors file")
    metadata = _check_metadata(header.pop(_METADATA, {}))
    entries = sorted((_entry(name, value) for name, value in header.items()), key=lambda entry: entry[1])
    position = 0
    for info, (begin, end) in entries:
        if begin != position:
            trouble = f"overlapping the previous tensor, which ends at {position}" if begin < position else \
                f"leaving a gap after byte {position}"
            raise InvalidInput(f"tensor {info.name!r} starts at body byte {begin}, {trouble}; "
                               "lay the tensors out back to back from offset 0")
        position = end
    return [info for info, _ in entries], metadata, position


def check_expected(infos: list[TensorInfo], expected: dict[str, TensorInfo]) -> None:
    """Refuse, in one message listing every problem, tensors that differ from `expected`."""
    got = {info.name: info for info in infos}
    problems = []
    if missing := sorted(expected.keys() - got.keys()):
        problems.append(f"missing {missing}")
    if unexpected := sorted(got.keys() - expected.keys()):
        problems.append(f"unexpected {unexpected}")
    for name in sorted(expected.keys() & got.keys()):
        if (got[name].dtype, got[name].shape) != (expected[name].dtype, expected[name].shape):
            problems.append(f"{name!r} is {got[name].describe()}, expected {expected[name].describe()}")
    if problems:
        raise InvalidInput("the tensors do not match the expected ones: " + "; ".join(problems)
                           + "; send exactly the expected names, dtypes and shapes")


# --- tensors <-> bytes ----------------------------------------------------------------------------

def _allocate(info: TensorInfo) -> tuple[torch.Tensor, memoryview]:
    """A fresh tensor for `info` and a writable byte view of its memory."""
    tensor = torch.empty(info.shape, dtype=DTYPES[info.dtype])
    return tensor, memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _check_tensor(info: TensorInfo, tensor: torch.Tensor) -> None:
    have = TensorInfo.of(info.name, tensor)
    if have != info:
        raise ValueError(f"tensor {info.name!r} is {have.describe()} but its info declares {info.describe()}; "
                         "produce the tensors in the order and with the layout of the infos")


def _byte_chunks(tensor: torch.Tensor) -> Iterator[memoryview]:
    """The tensor's raw bytes in chunks of at most CHUNK_BYTES (one contiguous CPU copy at most)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    for start in range(0, len(flat), CHUNK_BYTES):
        yield memoryview(flat[start:start + CHUNK_BYTES])


def stream_safetensors(infos: list[TensorInfo], tensors: Iterable[torch.Tensor],
                       metadata: dict[str, str] | None = None) -> Iterator[bytes]:
    """Yield a safetensors file: the header, then each tensor's bytes as `tensors` produces it."""
    yield build_header(infos, metadata)
    produced = iter(tensors)
    for info in infos:
        tensor = next(produced, None)
        if tensor is None:
            raise ValueError(f"the tensors ran out at {info.name!r}; produce one tensor per info")
        _check_tensor(info, tensor)
        for chunk in _byte_chunks(tensor):
            yield bytes(chunk)
        tensor = None  # free it before the next one is produced: one tensor alive at a time
    if next(produced, None) is not None:
        raise ValueError(f"more tensors than the {len(infos)} infos; produce one tensor per info")


def stream_safetensors_from(infos: list[TensorInfo], make_tensor: Callable[[TensorInfo], torch.Tensor],
                            start: int = 0, metadata: dict[str, str] | None = None) -> Iterator[bytes]:
    """The bytes of the file from offset `start` on (an HTTP Range), making only the tensors needed.

    Tensors before the one that holds `start` are never made, so resuming a download costs
    only what is left (plus part of one tensor).
    """
    header = build_header(infos, metadata)
    if not 0 <= start <= len(header) + sum(i.nbytes for i in infos):
        raise InvalidInput(f"range start {start} lies outside the file")
    if start < len(header):
        yield header[start:]
    position = len(header)
    for info in infos:
        end = position + info.nbytes
        if end > start and info.nbytes:
            tensor = make_tensor(info)
            _check_tensor(info, tensor)
            skip = max(start - position, 0)
            for chunk in _byte_chunks(tensor):
                if skip >= len(chunk):
                    skip -= len(chunk)
                    continue
                yield bytes(chunk[skip:])
                skip = 0
            tensor = None  # one tensor alive at a time
        position = end


# --- incremental parser ---------------------------------------------------------------------------

class StreamParser:
    """Sans-IO safetensors reader: `feed` bytes as they arrive, get tensors as they complete."""

    def __init__(self, *, expected: dict[str, TensorInfo] | None = None,
                 max_header_bytes: int = MAX_HEADER_BYTES, max_total_bytes: int | None = None) -> None:
        self._expected, self._max_header, self._max_total = expected, max_header_bytes, max_total_bytes
        self._head = bytearray()  # prefix and header, until parsed
        self._header_len: int | None = None
        self._infos: list[TensorInfo] | None = None
        self._metadata: dict[str, str] = {}
        self._body_size = self._received = self._next = self._filled = 0
        self._current: tuple[TensorInfo, torch.Tensor, memoryview] | None = None

    @property
    def header(self) -> list[TensorInfo] | None:
        """The tensors in file order, once the header is parsed."""
        return None if self._infos is None else list(self._infos)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def feed(self, data: bytes) -> list[tuple[TensorInfo, torch.Tensor]]:
        """Consume `data`; return the tensors it completed, in file order."""
        self._received += len(data)
        self._refuse_over_limit(self._received, "received")
        view = memoryview(data).cast("B")
        if self._infos is None:
            view = self._take_header(view)
            if self._infos is None:
                return []
        return self._take_body(view)

    def finish(self) -> None:
        """Refuse a stream that ended before its declared end."""
        if self._infos is None:
            needed = 8 if self._header_len is None else 8 + self._header_len
            raise InvalidInput(f"the stream ended inside the header after {self._received} of {needed} bytes; "
                               "send the whole file")
        body = self._received - 8 - self._header_len
        if body < self._body_size:
            raise InvalidInput(f"body ended after {body} of {self._body_size} bytes; "
                               "the upload was cut short, send the whole file")

    def _refuse_over_limit(self, size: int, what: str) -> None:
        if self._max_total is not None and size > self._max_total:
            raise PayloadTooLarge(f"the file is over the limit of {self._max_total} bytes ({what} {size}); "
                                  "send a smaller file")

    def _take_header(self, view: memoryview) -> memoryview:
        """Buffer the 8-byte prefix, then the header; parse and check the header once complete."""
        needed = 8 if self._header_len is None else 8 + self._header_len
        take = max(0, needed - len(self._head))
        self._head += view[:take]  # in place: a header fed byte by byte stays linear
        view = view[take:]
        if len(self._head) < needed:
            return view
        if self._header_len is None:
            self._header_len = header_length(self._head, self._max_header)
            self._refuse_over_limit(8 + self._header_len, "its header alone declares")
            return self._take_header(view)
        infos, self._metadata, self._body_size = parse_header(self._head[8:])
        if self._expected is not None:
            check_expected(infos, self._expected)
        self._refuse_over_limit(8 + self._header_len + self._body_size, "its header declares")
        self._infos, self._head = infos, bytearray()
        return view

    def _take_body(self, view: memoryview) -> list[tuple[TensorInfo, torch.Tensor]]:
        done = []
        while self._current is not None or self._next < len(self._infos):
            if self._current is None:
                info = self._infos[self._next]
                if not view and info.nbytes:  # allocate a tensor only once its bytes arrive
                    break
                self._current, self._filled, self._next = (info, *_allocate(info)), 0, self._next + 1
            info, tensor, buffer = self._current
            take = min(len(buffer) - self._filled, len(view))
            buffer[self._filled:self._filled + take] = view[:take]
            self._filled, view = self._filled + take, view[take:]
            if self._filled < len(buffer):
                break
            done.append((info, tensor))
            self._current = None
        if view:
            raise InvalidInput(f"the stream goes on after the end its header declares "
                               f"({8 + self._header_len + self._body_size} bytes); send nothing after the last tensor")
        return done


def read_stream(chunks: Iterable[bytes], **parser_kwargs) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
    """The (info, tensor) pairs of a safetensors byte stream; see StreamParser for the keywords."""
    parser = StreamParser(**parser_kwargs)
    for chunk in chunks:
        yield from parser.feed(chunk)
    parser.finish()


async def aread_stream(chunks: AsyncIterable[bytes], **parser_kwargs) -> AsyncIterator[tuple[TensorInfo, torch.Tensor]]:
    """`read_stream` for an async byte stream (an HTTP request body, say)."""
    parser = StreamParser(**parser_kwargs)
    async for chunk in chunks:
        for pair in parser.feed(chunk):
            yield pair
    parser.finish()


# --- files ------------------------------------------------------------------------------------------

def _read_exactly(file, buffer: memoryview, path: str) -> None:
    filled = 0
    while filled < len(buffer):
        count = file.readinto(buffer[filled:])
        if not count:
            raise InvalidInput(f"{path} ended early (read {filled} of {len(buffer)} bytes); the file changed or is truncated")
        filled += count


class SafetensorsFile:
    """Random-access reader of a safetensors file with seek/readinto (no mmap); not thread-safe.

    `source` is a path, or a binary file object open for reading (with seek and readinto),
    which the reader then owns and closes.
    """

    def __init__(self, source: str | os.PathLike | BinaryIO, *, max_header_bytes: int = MAX_HEADER_BYTES) -> None:
        if hasattr(source, "readinto"):
            self._file, self.path = source, str(getattr(source, "name", "<stream>"))
        else:
            self.path = os.fspath(source)
            self._file = open(self.path, "rb", buffering=0)
        try:
            self._read_header(max_header_bytes)
        except BaseException:
            self._file.close()
            raise

    def _read_header(self, max_header_bytes: int) -> None:
        size = self._file.seek(0, os.SEEK_END)
        self._file.seek(0)
        if size < 8:
            raise InvalidInput(f"{self.path} is {size} bytes, too short for a safetensors file; re-save it")
        prefix = bytearray(8)
        _read_exactly(self._file, memoryview(prefix), self.path)
        length = header_length(prefix, max_header_bytes)
        if 8 + length > size:
            raise InvalidInput(f"{self.path}: the header of {length} bytes runs past the end of the file; re-save it")
        raw = bytearray(length)
        _read_exactly(self._file, memoryview(raw), self.path)
        self.infos, self.metadata, body = parse_header(raw)
        if 8 + length + body != size:
            raise InvalidInput(f"{self.path} is {size} bytes but its header declares {8 + length + body}; "
                               "the file is truncated or has trailing bytes, re-save it")
        self._start, self._offsets = 8 + length, layout(self.infos)
        self._by_name = {info.name: info for info in self.infos}

    @property
    def names(self) -> list[str]:
        return [info.name for info in self.infos]

    def info(self, name: str) -> TensorInfo:
        if name not in self._by_name:
            raise KeyError(f"{self.path} has no tensor {name!r}; see .names for its {len(self.infos)} tensors")
        return self._by_name[name]

    def read(self, name: str) -> torch.Tensor:
        """A fresh tensor with the bytes of `name`."""
        tensor, buffer = _allocate(self.info(name))
        self._file.seek(self._start + self._offsets[name][0])
        _read_exactly(self._file, buffer, self.path)
        return tensor

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class SafetensorsFileWriter:
    """Writes a file whose layout is fixed up front; tensors may be written in any order.

    `target` is a path (the writer creates, fsyncs and closes the file, and deletes it on abort),
    or a binary file object open for writing (with seek and truncate) whose owner commits or
    discards it: the writer then only fills it and flushes.
    """

    def __init__(self, target: str | os.PathLike | BinaryIO, infos: list[TensorInfo],
                 metadata: dict[str, str] | None = None, *, private: bool = False) -> None:
        header = build_header(infos, metadata)
        self._start, self._offsets = len(header), layout(infos)
        self._infos = {info.name: info for info in infos}
        self._unwritten = set(self._infos)
        self._owned = not hasattr(target, "write")
        if self._owned:
            self.path = os.fspath(target)
            self._file = _create(self.path, private)
        else:
            self.path, self._file = str(getattr(target, "name", "<stream>")), target
        self._open = True
        try:
            self._file.write(header)
            self._file.truncate(self._start + sum(info.nbytes for info in infos))
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write `tensor` at the offset of `name`."""
        if name not in self._infos:
            raise ValueError(f"{name!r} is not in this file's layout; write only the names given to the writer")
        _check_tensor(self._infos[name], tensor)
        self._file.seek(self._start + self._offsets[name][0])
        for chunk in _byte_chunks(tensor):
            self._file.write(chunk)
        self._unwritten.discard(name)

    def close(self) -> None:
        """Flush (and fsync and close a file of its own); refuses, and stays open, while some
        tensor was never written."""
        if not self._open:
            return
        if self._unwritten:
            raise ValueError(f"{self.path}: tensors never written: {sorted(self._unwritten)}; "
                             "write them before close(), or abort()")
        self._file.flush()
        if self._owned:
            os.fsync(self._file.fileno())
            self._file.close()
        self._open = False

    def abort(self) -> None:
        """Stop writing; a file of its own is closed and deleted."""
        self._open = False
        if self._owned:
            self._file.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def __enter__(self) -> SafetensorsFileWriter:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        try:
            if exc_type is None:
                self.close()
        finally:
            if self._open:  # an exception in the block, or a tensor never written
                self.abort()


def _create(path: str, private: bool):
    """A new file opened for writing; `private` files are 0600 from the first byte (server secrets)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o666), "wb")


def save_file_atomic(path: str | os.PathLike, infos: list[TensorInfo], tensors: Iterable[torch.Tensor],
                     metadata: dict[str, str] | None = None, *, private: bool = False) -> None:
    """Stream the file into `path.tmp`, fsync it and rename it over `path`: readers see old or new."""
    path = os.fspath(path)
    temporary = f"{path}.tmp"
    try:
        with _create(temporary, private) as file:
            for chunk in stream_safetensors(infos, tensors, metadata):
                file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    if os.name == "posix":  # make the rename itself durable
        directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
