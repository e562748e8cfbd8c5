"""The safetensors codec against the reference `safetensors` library, and every refusal."""

import asyncio
import json
import os
import random

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pum.common.codec import (
    CHUNK_BYTES, DTYPES, SafetensorsFile, SafetensorsFileWriter, StreamParser, TensorInfo, aread_stream,
    build_header, dtype_name, layout, read_stream, save_file_atomic, stream_safetensors, total_size,
)
from pum.common.errors import InvalidInput, PayloadTooLarge

torch.set_num_threads(1)


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "weight": torch.randn(3, 4, generator=generator),
        "half": torch.randn(5, generator=generator).half(),
        "brain": torch.randn(2, 3, generator=generator).bfloat16(),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 7),
        "ids": torch.arange(-3, 3, dtype=torch.int64),
        "small": torch.tensor([[1, -2], [3, -4]], dtype=torch.int8),
        "bytes": torch.tensor([0, 255, 7], dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "i32": torch.tensor([7], dtype=torch.int32),
        "i16": torch.tensor([-7, 8], dtype=torch.int16),
    }


def encode(tensors: dict[str, torch.Tensor], metadata=None) -> bytes:
    infos = [TensorInfo.of(name, tensor) for name, tensor in tensors.items()]
    return b"".join(stream_safetensors(infos, tensors.values(), metadata))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (so NaN payloads compare equal too)."""
    as_bytes = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def chunked(data: bytes, rng: random.Random, largest: int = 40) -> list[bytes]:
    chunks, position = [], 0
    while position < len(data):
        size = rng.randint(1, largest)
        chunks.append(data[position:position + size])
        position += size
    return chunks


def parse(chunks, **kwargs) -> dict[str, torch.Tensor]:
    return {info.name: tensor for info, tensor in read_stream(chunks, **kwargs)}


def raw_file(header: object, body: bytes = b"", *, pad: bool = True) -> bytes:
    """A file with a hand-written header (not necessarily valid)."""
    raw = (header if isinstance(header, bytes) else json.dumps(header).encode())
    raw += b" " * (-len(raw) % 8 if pad else 0)
    return len(raw).to_bytes(8, "little") + raw + body


def refusal(data: bytes, **kwargs) -> str:
    with pytest.raises(InvalidInput) as caught:
        parse([data], **kwargs)
    return str(caught.value)


# --- dtypes and infos --------------------------------------------------------------------------

def test_dtype_names_round_trip_and_unknown_dtype_lists_supported():
    assert set(DTYPES) == {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"}
    for name, dtype in DTYPES.items():
        assert dtype_name(dtype) == name
    with pytest.raises(ValueError, match="not supported.*torch.float32"):
        dtype_name(torch.complex64)


def test_tensor_info_sizes():
    assert TensorInfo("a", "F32", (2, 3)).nbytes == 24
    assert TensorInfo("a", "BF16", (2, 3)).numel == 6
    scalar = TensorInfo.of("s", torch.tensor(1.0, dtype=torch.float64))
    assert (scalar.shape, scalar.numel, scalar.nbytes) == ((), 1, 8)
    assert TensorInfo("e", "I64", [0, 5]).nbytes == 0  # a list shape becomes a tuple
    assert TensorInfo("e", "I64", [0, 5]).shape == (0, 5)


def test_build_header_pads_lays_out_and_sizes():
    infos = [TensorInfo("a", "F32", (3,)), TensorInfo("b", "U8", (5,)), TensorInfo("c", "F16", (2,))]
    header = build_header(infos, {"round": "3"})
    assert len(header) % 8 == 0
    assert int.from_bytes(header[:8], "little") == len(header) - 8
    assert layout(infos) == {"a": (0, 12), "b": (12, 17), "c": (17, 21)}
    assert json.loads(header[8:])["__metadata__"] == {"round": "3"}
    assert total_size(infos, {"round": "3"}) == len(header) + 21


def test_build_header_refuses_duplicate_and_reserved_names():
    with pytest.raises(ValueError, match=r"unique.*\['a'\]"):
        build_header([TensorInfo("a", "F32", (1,)), TensorInfo("a", "F32", (2,))])
    with pytest.raises(ValueError, match="__metadata__"):
        build_header([TensorInfo("__metadata__", "F32", (1,))])


# --- writing a stream ------------------------------------------------------------------------------

def test_stream_loads_identically_with_the_reference_library(tmp_path):
    tensors = sample_tensors()
    data = encode(tensors, {"job": "j1"})
    loaded = safetensors.torch.load(data)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert same(loaded[name], tensor), name
    (tmp_path / "m.safetensors").write_bytes(data)
    with safetensors.safe_open(tmp_path / "m.safetensors", "pt") as reference:
        assert reference.metadata() == {"job": "j1"}


def test_stream_yields_large_tensors_in_chunks_and_never_the_whole_file():
    big = torch.arange(3 * CHUNK_BYTES // 4 + 5, dtype=torch.float32)  # 3 MiB and 20 bytes
    infos = [TensorInfo.of("big", big), TensorInfo("tiny", "U8", (1,))]
    pieces = list(stream_safetensors(infos, [big, torch.tensor([9], dtype=torch.uint8)]))
    assert max(len(piece) for piece in pieces[1:]) == CHUNK_BYTES
    assert [len(piece) for piece in pieces[1:]] == [CHUNK_BYTES] * 3 + [20, 1]
    assert same(safetensors.torch.load(b"".join(pieces))["big"], big)


def test_stream_accepts_non_contiguous_tensors():
    tensor = torch.arange(12, dtype=torch.int32).reshape(3, 4).t()
    assert same(safetensors.torch.load(encode({"t": tensor}))["t"], tensor)


def test_stream_refuses_tensors_that_do_not_match_their_info():
    infos = [TensorInfo("a", "F32", (2, 3))]
    with pytest.raises(ValueError, match=r"'a' is F16 \[2, 3\] but its info declares F32 \[2, 3\]"):
        list(stream_safetensors(infos, [torch.zeros(2, 3, dtype=torch.float16)]))
    with pytest.raises(ValueError, match=r"'a' is F32 \[3, 2\]"):
        list(stream_safetensors(infos, [torch.zeros(3, 2)]))
    with pytest.raises(ValueError, match="ran out at 'a'"):
        list(stream_safetensors(infos, []))
    with pytest.raises(ValueError, match="more tensors than the 1 infos"):
        list(stream_safetensors(infos, [torch.zeros(2, 3), torch.zeros(1)]))


def test_mismatch_message_never_shows_tensor_values():
    with pytest.raises(ValueError) as caught:
        list(stream_safetensors([TensorInfo("a", "F32", (2,))], [torch.tensor([1234.5, 6789.25], dtype=torch.float64)]))
    assert "1234" not in str(caught.value) and "6789" not in str(caught.value)


# --- parsing a stream ------------------------------------------------------------------------------

@pytest.mark.parametrize("largest", [1, 3, 64, 10_000])
def test_parser_reads_the_reference_library_in_random_chunks(largest):
    tensors = sample_tensors()
    data = safetensors.torch.save(tensors, metadata={"k": "v"})
    parser = StreamParser()
    got = [pair for chunk in chunked(data, random.Random(largest), largest) for pair in parser.feed(chunk)]
    parser.finish()
    assert parser.metadata == {"k": "v"}
    assert [info.name for info, _ in got] == [info.name for info in parser.header]
    assert {info.name: info for info, _ in got} == {name: TensorInfo.of(name, t) for name, t in tensors.items()}
    for info, tensor in got:
        assert same(tensor, tensors[info.name]), info.name


def test_parser_returns_each_tensor_as_soon_as_its_bytes_are_complete():
    data = encode({"a": torch.ones(4), "b": torch.zeros(2, dtype=torch.int64), "z": torch.empty(0)})
    header_end = len(data) - 16 - 16
    parser = StreamParser()
    assert parser.feed(data[:header_end - 1]) == [] and parser.header is None
    assert parser.feed(data[header_end - 1:header_end]) == []
    assert [info.name for info in parser.header] == ["a", "b", "z"]
    assert parser.feed(data[header_end:header_end + 15]) == []
    assert [info.name for info, _ in parser.feed(data[header_end + 15:header_end + 17])] == ["a"]
    assert [info.name for info, _ in parser.feed(data[header_end + 17:])] == ["b", "z"]  # z is empty
    parser.finish()


def test_parsed_tensors_are_fresh_and_own_exactly_their_bytes():
    data = encode({"a": torch.ones(4), "b": torch.ones(4)})
    (_, a), (_, b) = list(read_stream([data]))
    a += 1
    assert torch.equal(b, torch.ones(4))
    assert a.untyped_storage().nbytes() == 16 and a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()


def test_async_reader():
    tensors = sample_tensors()
    data = encode(tensors)

    async def body():
        for chunk in chunked(data, random.Random(1)):
            yield chunk

    async def collect():
        return {info.name: tensor async for info, tensor in aread_stream(body())}

    got = asyncio.run(collect())
    assert all(same(got[name], tensor) for name, tensor in tensors.items()) and got.keys() == tensors.keys()


def test_async_reader_refuses_a_truncated_body():
    async def body():
        yield encode({"a": torch.ones(4)})[:-1]

    async def collect():
        return [pair async for pair in aread_stream(body())]

    with pytest.raises(InvalidInput, match="body ended after 15 of 16 bytes"):
        asyncio.run(collect())


# --- refusals --------------------------------------------------------------------------------------

def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def test_refuses_a_header_longer_than_the_limit_from_the_prefix_alone():
    parser = StreamParser(max_header_bytes=64)
    data = raw_file({"a": entry(), "b": entry(offsets=[8, 16])})
    with pytest.raises(InvalidInput, match=f"header declares {len(data) - 8} bytes, over the limit of 64"):
        parser.feed(data[:8])
    with pytest.raises(InvalidInput, match="over the limit of 16777216"):
        StreamParser().feed((2**40).to_bytes(8, "little"))


@pytest.mark.parametrize("header, words", [
    (b"not json", "not valid UTF-8 JSON"),
    (b"\xff\xfe{}", "not valid UTF-8 JSON"),
    (b"[" * 100_000, "not valid UTF-8 JSON"),
    ([1, 2], "must be a JSON object (got list)"),
    ({"a": [1]}, "entry 'a' must be an object with keys ['dtype', 'shape', 'data_offsets']"),
    ({"a": {"dtype": "F32", "shape": [2]}}, "(missing ['data_offsets'])"),
    ({"a": entry(dtype="F8")}, "dtype 'F8' is not supported; use one of ['F64', 'F32'"),
    ({"a": entry(dtype=["F32"])}, "dtype ['F32'] is not supported"),
    ({"a": entry(shape=[-1])}, "shape must be a list of non-negative integers"),
    ({"a": entry(shape=[2.0])}, "shape must be a list of non-negative integers"),
    ({"a": entry(shape=[True])}, "shape must be a list of non-negative integers"),
    ({"a": {**entry(), "shape": 2}}, "shape must be a list of non-negative integers"),
    ({"a": entry(offsets=[0])}, "data_offsets must be [begin, end]"),
    ({"a": entry(offsets=[0, "8"])}, "data_offsets must be [begin, end]"),
    ({"a": entry(offsets=[8, 0])}, "data_offsets must be [begin, end]"),
    ({"a": entry(offsets=[0, 12])}, "data_offsets span 12 bytes but F32 [2] needs 8"),
    ({"a": entry(offsets=[4, 12])}, "'a' starts at body byte 4, leaving a gap after byte 0"),
    ({"a": entry(), "b": entry(offsets=[4, 12])}, "'b' starts at body byte 4, overlapping the previous tensor"),
    ({"a": entry(), "b": entry(offsets=[12, 20])}, "'b' starts at body byte 12, leaving a gap after byte 8"),
    ({"__metadata__": {"n": 1}}, "__metadata__ must be an object mapping strings to strings"),
])
def test_refuses_malformed_headers_with_a_message_saying_what_is_wrong(header, words):
    assert words in refusal(raw_file(header, bytes(32)))


def test_accepts_offsets_listed_out_of_order():
    body = bytes(range(16))
    got = parse([raw_file({"b": entry(offsets=[8, 16]), "a": entry(dtype="I32", offsets=[0, 8])}, body)])
    assert list(got) == ["a", "b"]
    assert same(got["a"], torch.frombuffer(bytearray(body[:8]), dtype=torch.int32))


def test_expected_names_report_every_problem_at_once():
    data = encode({"keep": torch.zeros(2), "extra": torch.zeros(1), "wide": torch.zeros(3), "kind": torch.zeros(2)})
    expected = {
        "keep": TensorInfo("keep", "F32", (2,)), "gone": TensorInfo("gone", "F32", (1,)),
        "lost": TensorInfo("lost", "F32", (1,)), "wide": TensorInfo("wide", "F32", (2,)),
        "kind": TensorInfo("kind", "BF16", (2,)),
    }
    message = refusal(data, expected=expected)
    assert "missing ['gone', 'lost']" in message
    assert "unexpected ['extra']" in message
    assert "'wide' is F32 [3], expected F32 [2]" in message
    assert "'kind' is F32 [2], expected BF16 [2]" in message
    assert "'keep'" not in message
    assert parse([data], expected={name: TensorInfo.of(name, torch.zeros(n)) for name, n in
                                   [("keep", 2), ("extra", 1), ("wide", 3), ("kind", 2)]}).keys() == \
        {"keep", "extra", "wide", "kind"}


def test_max_total_bytes_is_checked_on_the_prefix_on_the_header_and_on_arrival():
    data = encode({"a": torch.zeros(100)})
    assert len(data) < 500
    with pytest.raises(PayloadTooLarge, match="over the limit of 16 bytes .its header alone declares"):
        StreamParser(max_total_bytes=16).feed(data[:8])
    with pytest.raises(PayloadTooLarge, match="over the limit of 300 bytes .its header declares"):
        parse(chunked(data, random.Random(0)), max_total_bytes=300)
    parser = StreamParser(max_total_bytes=len(data))
    parser.feed(data)
    with pytest.raises(PayloadTooLarge, match=f"received {len(data) + 1}"):
        parser.feed(b"x")
    assert len(parse([data], max_total_bytes=len(data))["a"]) == 100


def test_finish_refuses_a_truncated_body_or_header():
    data = encode({"a": torch.zeros(4), "b": torch.zeros(4)})
    parser = StreamParser()
    assert [info.name for info, _ in parser.feed(data[:-3])] == ["a"]
    with pytest.raises(InvalidInput, match="body ended after 29 of 32 bytes"):
        parser.finish()
    with pytest.raises(InvalidInput, match="ended inside the header after 5 of 8 bytes"):
        parse([data[:5]])
    with pytest.raises(InvalidInput, match=f"ended inside the header after 10 of {len(data) - 32} bytes"):
        parse([data[:10]])


def test_refuses_bytes_after_the_declared_end():
    data = encode({"a": torch.zeros(4)})
    assert "goes on after the end its header declares" in refusal(data + b"\0")
    parser = StreamParser()
    parser.feed(data)
    with pytest.raises(InvalidInput, match="send nothing after the last tensor"):
        parser.feed(b"more")


# --- files -----------------------------------------------------------------------------------------

def test_writer_out_of_order_then_reader_and_reference_library(tmp_path):
    tensors = sample_tensors()
    infos = [TensorInfo.of(name, tensor) for name, tensor in tensors.items()]
    path = tmp_path / "model.safetensors"
    with SafetensorsFileWriter(path, infos, {"round": "1"}) as writer:
        for name in reversed(list(tensors)):
            writer.write(name, tensors[name])
    assert os.path.getsize(path) == total_size(infos, {"round": "1"})
    assert path.read_bytes() == encode(tensors, {"round": "1"})
    with SafetensorsFile(path) as reader:
        assert reader.infos == infos and reader.names == list(tensors) and reader.metadata == {"round": "1"}
        assert reader.info("brain") == TensorInfo("brain", "BF16", (2, 3))
        for name in ["mask", "weight", "scalar", "empty", "brain"]:
            assert same(reader.read(name), tensors[name]), name
        with pytest.raises(KeyError, match="no tensor 'nope'"):
            reader.read("nope")
    reference = safetensors.torch.load_file(path)
    assert all(same(reference[name], tensor) for name, tensor in tensors.items())


def test_reader_reads_files_the_reference_library_wrote(tmp_path):
    tensors = sample_tensors()
    safetensors.torch.save_file(tensors, tmp_path / "ref.safetensors")
    with SafetensorsFile(tmp_path / "ref.safetensors") as reader:
        assert set(reader.names) == set(tensors)
        assert all(same(reader.read(name), tensor) for name, tensor in tensors.items())


def test_writer_refuses_to_close_while_a_tensor_is_missing(tmp_path):
    infos = [TensorInfo("a", "F32", (2,)), TensorInfo("b", "F32", (2,)), TensorInfo("c", "I8", (1,))]
    path = tmp_path / "partial.safetensors"
    writer = SafetensorsFileWriter(path, infos)
    writer.write("b", torch.ones(2))
    with pytest.raises(ValueError, match=r"never written: \['a', 'c'\]"):
        writer.close()
    writer.write("a", torch.ones(2))
    writer.write("c", torch.ones(1, dtype=torch.int8))
    writer.close()
    with SafetensorsFile(path) as reader:
        assert torch.equal(reader.read("a"), torch.ones(2))


def test_writer_deletes_its_file_on_error_or_missing_tensor(tmp_path):
    infos = [TensorInfo("a", "F32", (2,))]
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match=r"never written: \['a'\]"):
        with SafetensorsFileWriter(path, infos):
            pass
    assert not path.exists()
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsFileWriter(path, infos) as writer:
            writer.write("a", torch.ones(2))
            raise RuntimeError("boom")
    assert not path.exists()
    with SafetensorsFileWriter(path, infos) as writer:
        with pytest.raises(ValueError, match="'b' is not in this file's layout"):
            writer.write("b", torch.ones(2))
        with pytest.raises(ValueError, match=r"'a' is F32 \[3\] but its info declares F32 \[2\]"):
            writer.write("a", torch.ones(3))
        writer.write("a", torch.ones(2))
    assert path.exists()


def test_reader_refuses_files_whose_size_does_not_match(tmp_path):
    path = tmp_path / "m.safetensors"
    data = encode({"a": torch.zeros(4)})
    for bad, words in [(data + b"\0", "has trailing bytes"), (data[:-1], "is truncated"),
                       (data[:20], "runs past the end of the file"), (data[:5], "too short")]:
        path.write_bytes(bad)
        with pytest.raises(InvalidInput, match=words):
            SafetensorsFile(path)
    path.write_bytes(raw_file({"a": entry(dtype="Q")}, bytes(8)))
    with pytest.raises(InvalidInput, match="dtype 'Q' is not supported"):
        SafetensorsFile(path)


def test_save_file_atomic_replaces_the_file_and_leaves_nothing_behind_on_error(tmp_path):
    path = tmp_path / "m.safetensors"
    infos = [TensorInfo("a", "F32", (2,))]
    save_file_atomic(path, infos, [torch.ones(2)], {"v": "1"})
    save_file_atomic(path, infos, [torch.full((2,), 3.0)], {"v": "2"})
    assert os.listdir(tmp_path) == ["m.safetensors"]
    with SafetensorsFile(path) as reader:
        assert reader.metadata == {"v": "2"} and torch.equal(reader.read("a"), torch.full((2,), 3.0))
    with pytest.raises(ValueError, match="is F32 \\[3\\]"):
        save_file_atomic(path, infos, [torch.ones(3)])
    assert os.listdir(tmp_path) == ["m.safetensors"]
    with SafetensorsFile(path) as reader:
        assert reader.metadata == {"v": "2"}


# --- property -------------------------------------------------------------------------------------

@st.composite
def tensor_lists(draw):
    specs = draw(st.lists(st.tuples(st.sampled_from(sorted(DTYPES)), st.lists(st.integers(0, 4), max_size=3)),
                          max_size=6))
    seed = draw(st.integers(0, 2**32 - 1))
    generator, tensors = torch.Generator().manual_seed(seed), {}
    for index, (dtype, shape) in enumerate(specs):
        info = TensorInfo(f"t{index}", dtype, tuple(shape))
        raw = torch.randint(0, 256, (info.nbytes,), dtype=torch.uint8, generator=generator)
        if dtype == "BOOL":
            raw %= 2
        tensors[info.name] = raw.view(DTYPES[dtype]).reshape(shape)
    return tensors


@settings(max_examples=150, deadline=None)
@given(tensors=tensor_lists(), metadata=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
       cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_parse_of_stream_is_the_identity(tensors, metadata, cuts):
    data = encode(tensors, metadata)
    bounds = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    parser = StreamParser()
    got = [pair for start, end in zip(bounds, bounds[1:]) for pair in parser.feed(data[start:end])]
    parser.finish()
    assert parser.metadata == metadata
    assert [info.name for info, _ in got] == list(tensors)
    assert all(same(tensor, tensors[info.name]) and info == TensorInfo.of(info.name, tensor) for info, tensor in got)
