"""tabgpt.safetensors against the reference `safetensors` library (native only): files we write load there with
equal arrays and metadata, files it writes load here, corrupt files fail with a clear CheckpointError, and an
interrupted save leaves the previous file intact."""

import array
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import safetensors
import safetensors.numpy

from tabgpt import safetensors as st

NP_DTYPES = {"F32": np.float32, "I64": np.int64, "U8": np.uint8, "U32": np.uint32, "F64": np.float64,
             "I32": np.int32, "F16": np.float16, "BOOL": np.bool_}


def sample_arrays():
    """float32, int64, uint8, a 0-d tensor and an empty one."""
    rng = np.random.default_rng(0)
    return {
        "wte.weight": rng.standard_normal((5, 3)).astype(np.float32),
        "step": np.array(1234567890123, dtype=np.int64),  # 0-d
        "bytes": rng.integers(0, 256, size=(7,), dtype=np.uint8),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "ids": np.arange(6, dtype=np.int64).reshape(2, 3) - 3,
        "u32": np.array([0, 1, 2**32 - 1], dtype=np.uint32),
    }


def to_triples(arrays):
    dtype_of = {v: k for k, v in NP_DTYPES.items()}
    return {k: (dtype_of[a.dtype.type], a.shape, a.tobytes()) for k, a in arrays.items()}


def as_array(dtype, shape, view):
    return np.frombuffer(view, dtype=NP_DTYPES[dtype]).reshape(shape)


def assert_same_arrays(got, want):
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for k in want:
        g, w = got[k], want[k]
        assert g.dtype == w.dtype and g.shape == w.shape, (k, g.dtype, g.shape, w.dtype, w.shape)
        assert np.array_equal(g, w), (k, g, w)


# ---------------------------------------------------------------------------------------------------------
# interoperability

def test_files_we_write_load_in_the_reference_library(tmp_path):
    arrays = sample_arrays()
    meta = {"format": "pt", "step": "42", "note": "ünïcode ✓"}
    path = tmp_path / "model.safetensors"
    data = st.save(path, to_triples(arrays), meta)
    assert path.read_bytes() == bytes(data), "returned bytes differ from the file written"

    assert_same_arrays(safetensors.numpy.load_file(str(path)), arrays)
    with safetensors.safe_open(str(path), framework="np") as f:
        assert f.metadata() == meta, f.metadata()
    assert_same_arrays(safetensors.numpy.load(bytes(data)), arrays)

    # layout: header padded with spaces to a multiple of 8, tensors in the order given
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0, n
    header = json.loads(bytes(data[8:8 + n]))
    assert bytes(data[8:8 + n]).rstrip(b" ").endswith(b"}")
    names = [k for k in header if k != "__metadata__"]
    assert names == list(arrays), names
    offsets = [header[k]["data_offsets"] for k in names]
    assert offsets[0][0] == 0 and all(a[1] == b[0] for a, b in zip(offsets, offsets[1:])), offsets


def test_files_the_reference_library_writes_load_here(tmp_path):
    arrays = sample_arrays()
    meta = {"format": "np", "k": "v"}
    path = tmp_path / "ref.safetensors"
    safetensors.numpy.save_file(arrays, str(path), metadata=meta)
    for source in (path, str(path), path.read_bytes(), bytearray(path.read_bytes())):
        tensors, got_meta = st.load(source)
        assert got_meta == meta, got_meta
        assert_same_arrays({k: as_array(*v) for k, v in tensors.items()}, arrays)
        header, header_meta = st.load_header(source)
        assert header_meta == meta
        assert {k: (d, s) for k, (d, s, _) in header.items()} == {k: (d, s) for k, (d, s, _) in tensors.items()}
        # load returns tensors in file order
        starts = [b for _, _, (b, _) in header.values()]
        assert starts == sorted(starts), starts


def test_round_trip_without_metadata_and_with_array_and_memoryview_inputs():
    floats = array.array("f", [0.5, -1.25, 3.0, 1e-30])
    data = st.save(None, {"a": ("F32", (2, 2), floats), "b": ("U8", (3,), memoryview(b"xyz")),
                          "c": ("F32", (4,), np.asarray(floats, dtype=np.float32))})
    tensors, meta = st.load(data)
    assert meta == {}
    assert tensors["a"][:2] == ("F32", (2, 2)) and tensors["a"][2].tobytes() == floats.tobytes()
    assert tensors["b"][2].tobytes() == b"xyz" and tensors["c"][2].tobytes() == floats.tobytes()
    assert list(safetensors.numpy.load(bytes(data))["a"].ravel()) == list(floats)


def test_save_rejects_a_byte_count_that_does_not_match_the_shape():
    with pytest.raises(st.CheckpointError, match=r"needs 24 bytes, got 20"):
        st.save(None, {"w": ("F32", (2, 3), b"\0" * 20)})
    with pytest.raises(st.CheckpointError, match="unknown dtype"):
        st.save(None, {"w": ("F12", (1,), b"\0")})
    with pytest.raises(st.CheckpointError, match="str to str"):
        st.save(None, {}, {"step": 3})


# ---------------------------------------------------------------------------------------------------------
# corrupt files: each must fail here with a CheckpointError naming the file, and in the reference library too

def raw_file(header, data=b"", pad=True):
    head = json.dumps(header).encode()
    if pad:
        head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data


GOOD = raw_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]}}, bytes(range(12)))


def _bad_json():
    head = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]'  # cut JSON
    return struct.pack("<Q", len(head)) + head + b"x"


CORRUPT = {
    "shorter than the length field": (GOOD[:5], "only 5 bytes"),
    "cut inside the header": (GOOD[:30], "runs past the end of the file"),
    "cut inside the data": (GOOD[:-3], "run past the end of the data"),
    "absurd header length": (struct.pack("<Q", 2**40) + GOOD[8:], "bad header length"),
    "header length past the end": (struct.pack("<Q", len(GOOD)) + GOOD[8:], "runs past the end of the file"),
    "bad JSON": (_bad_json(), "not valid JSON"),
    "JSON that is not an object": (raw_file([1, 2]), "not valid JSON|not an object"),
    "not UTF-8": (struct.pack("<Q", 8) + b"{\xff\xfe}    ", "not valid JSON"),
    "offsets out of range": (raw_file({"a": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}}, b"abcd"),
                             "run past the end of the data"),
    "offsets overlapping": (raw_file({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                                      "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, b"abcdef"),
                            "overlap"),
    "offsets reversed": (raw_file({"a": {"dtype": "U8", "shape": [0], "data_offsets": [2, 0]}}, b"ab"),
                         "bad data_offsets"),
    "gap between tensors": (raw_file({"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, b"abcd"),
                            "gap of 2 bytes"),
    "bytes after the last tensor": (raw_file({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}},
                                             b"abcd"), "not described"),
    "unknown dtype": (raw_file({"a": {"dtype": "F12", "shape": [1], "data_offsets": [0, 1]}}, b"a"),
                      "unknown dtype 'F12'"),
    "shape does not match the offsets": (raw_file({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                                                  bytes(8)), "needs 12"),
    "negative dimension": (raw_file({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}), "bad shape"),
    "duplicate tensor name": (b"", "duplicate key"),  # filled below
    "metadata that is not strings": (raw_file({"__metadata__": {"step": 3}}), "must map strings to strings"),
}
_dup = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}'
CORRUPT["duplicate tensor name"] = (struct.pack("<Q", len(_dup)) + _dup + b"xy", "duplicate key")


def test_the_good_file_used_for_the_corruption_cases_loads_in_both():
    tensors, _ = st.load(GOOD)
    assert [(k, d, s) for k, (d, s, _) in tensors.items()] == [("a", "F32", (2,)), ("b", "U8", (4,))]
    assert sorted(name for name, _ in safetensors.deserialize(GOOD)) == ["a", "b"]


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_files_raise_a_clear_checkpoint_error(case, tmp_path):
    data, expected = CORRUPT[case]
    # the case really is corrupt: the reference library refuses it as well
    with pytest.raises(Exception) as ref:
        safetensors.deserialize(data)
    print("reference library:", ref.value)

    path = tmp_path / "broken.safetensors"
    path.write_bytes(data)
    for source in (path, data):
        with pytest.raises(st.CheckpointError, match=expected) as err:
            st.load(source, name=None if source is path else "upload.safetensors")
        msg = str(err.value)
        print(case, "->", msg)
        assert (str(path) if source is path else "upload.safetensors") in msg, msg  # names the file
        assert "; " in msg and any(w in msg for w in ("save it again", "copy it again", "convert", "check")), msg
    # load_header reads only the header but checks it against the file's size: it sees the same problems
    with pytest.raises(st.CheckpointError, match=expected):
        st.load_header(path)


# ---------------------------------------------------------------------------------------------------------
# atomic writes

def test_a_failure_in_the_middle_of_a_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    old = st.save(path, to_triples(sample_arrays()), {"step": "1"})
    new = {"w": ("F32", (1 << 16,), bytes(1 << 18))}

    def write_half_then_fail(fd, view):
        os.write(fd, view[:len(view) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st, "_write_all", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        st.save(path, new, {"step": "2"})
    assert path.read_bytes() == bytes(old), "the previous checkpoint was damaged"
    assert st.load(path)[1] == {"step": "1"}
    assert os.listdir(tmp_path) == ["model.safetensors"], os.listdir(tmp_path)  # temp file cleaned up

    monkeypatch.undo()
    st.save(path, new, {"step": "2"})
    assert st.load(path)[1] == {"step": "2"} and os.listdir(tmp_path) == ["model.safetensors"]


def test_a_process_killed_while_saving_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "state.safetensors"
    old = st.save(path, {"x": ("U8", (3,), b"old")})
    # the child dies (no cleanup, no exception handling) after writing part of a 4 MiB checkpoint
    child = (
        "import os, sys\n"
        "from tabgpt import safetensors as st\n"
        "def dying_write(fd, view):\n"
        "    os.write(fd, view[:len(view) // 3])\n"
        "    os._exit(3)\n"
        "st._write_all = dying_write\n"
        "st.save(sys.argv[1], {'x': ('U8', (1 << 22,), bytes(1 << 22))})\n"
    )
    rc = subprocess.run([sys.executable, "-c", child, str(path)], timeout=60).returncode
    assert rc == 3, rc
    assert path.read_bytes() == bytes(old), "the previous checkpoint was damaged"
    assert st.load(path)[0]["x"][2].tobytes() == b"old"


def test_atomic_write_creates_and_replaces_files_with_normal_permissions(tmp_path):
    path = tmp_path / "config.json"
    st.atomic_write(path, b'{"n_layer": 2}')
    st.atomic_write(str(path), bytearray(b'{"n_layer": 4}'))
    assert path.read_bytes() == b'{"n_layer": 4}'
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, oct(path.stat().st_mode)
    assert os.listdir(tmp_path) == ["config.json"]
