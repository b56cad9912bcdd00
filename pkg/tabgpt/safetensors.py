"""The safetensors checkpoint format, written and read in pure Python.

The `safetensors` wheel is compiled (Rust) and cannot load in Pyodide, so this module implements the format
with the standard library only. A file is:

    8 bytes     N, the header length, unsigned little-endian
    N bytes     a JSON object, UTF-8, padded with spaces to a multiple of 8:
                {"__metadata__": {str: str},                       (optional)
                 "wte.weight": {"dtype": "F32", "shape": [V, C], "data_offsets": [begin, end]}, ...}
    the rest    the tensors' bytes, little-endian, row-major; offsets count from the end of the header and
                together cover this part exactly, with no gaps and no overlaps

We write the tensors in the order given (the caller decides the layout) and read any valid order. Tensors
are handed over as (dtype, shape, bytes-like) triples: raw bytes keep this module free of numpy, and the GPU
reads and writes raw bytes anyway. On little-endian hosts (x86, ARM, WebAssembly) array.array('f') and
numpy buffers already have the file's byte order.

Writes are atomic (temp file in the same folder, fsync, os.replace): an interrupted save never leaves a
broken file and never destroys the previous one.
"""

import json
import os
import struct

# bytes per element of every whole-byte dtype the format defines (sub-byte F4/F6 types are not supported)
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
MAX_HEADER_SIZE = 100_000_000  # the reference implementation's limit; a bigger N means a corrupt file
METADATA_KEY = "__metadata__"
_CHUNK = 1 << 24  # write 16 MiB at a time: keeps each system call small in the browser's file systems


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (or tensors that cannot be written): says which file and why."""


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def _as_bytes(data):
    """A flat byte view of any C-contiguous bytes-like object (bytes, bytearray, array.array, numpy array)."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


# ----------------------------------------------------------------------------------------------------------
# writing

def atomic_write(path, data):
    """Replace the file at `path` with `data` (bytes-like) so that readers see the old file or the new one,
    never a mix: write a temp file beside it, fsync it, then os.replace it over the target."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    view = _as_bytes(data)
    tmp = os.path.join(folder, ".%s.%d.%s.tmp" % (os.path.basename(path), os.getpid(), os.urandom(4).hex()))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
    try:
        try:
            _write_all(fd, view)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_folder(folder)


def _write_all(fd, view):
    """os.write until every byte is out (a single write may be partial)."""
    pos, n = 0, len(view)
    while pos < n:
        pos += os.write(fd, view[pos:pos + _CHUNK])


def _fsync_folder(folder):
    """Make the rename itself durable where the platform allows it (POSIX); elsewhere it is a no-op."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(path, tensors, metadata=None):
    """Serialise `tensors` ({name: (dtype, shape, bytes-like)}) and optional `metadata` ({str: str}) in
    safetensors format, in the order given. Writes the file atomically when `path` is not None.
    Returns the whole file as a bytearray (filled in place, one copy of each tensor) so that the browser can
    store or download it."""
    header = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise CheckpointError("metadata must map str to str, got %r: %r (convert values with str() "
                                      "or json.dumps())" % (k, v))
        header[METADATA_KEY] = dict(metadata)
    views = []
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        if not isinstance(name, str) or name == METADATA_KEY:
            raise CheckpointError("bad tensor name %r" % (name,))
        if dtype not in DTYPE_SIZES:
            raise CheckpointError("tensor %r: unknown dtype %r, expected one of %s"
                                  % (name, dtype, ", ".join(DTYPE_SIZES)))
        shape = [int(d) for d in shape]
        if any(d < 0 for d in shape):
            raise CheckpointError("tensor %r: negative dimension in shape %r" % (name, shape))
        view = _as_bytes(data)
        nbytes = _numel(shape) * DTYPE_SIZES[dtype]
        if len(view) != nbytes:
            raise CheckpointError("tensor %r: shape %r of %s needs %d bytes, got %d"
                                  % (name, shape, dtype, nbytes, len(view)))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        views.append(view)
        offset += nbytes
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * (-len(head) % 8)  # pad so that the data starts 8-byte aligned
    out = bytearray(8 + len(head) + offset)
    struct.pack_into("<Q", out, 0, len(head))
    pos = 8 + len(head)
    out[8:pos] = head
    for view in views:
        out[pos:pos + len(view)] = view
        pos += len(view)
    if path is not None:
        atomic_write(path, out)
    return out


# ----------------------------------------------------------------------------------------------------------
# reading

def _fail(name, what, todo="the file is damaged: save it again or restore it from a copy"):
    raise CheckpointError("%s: %s; %s" % (name, what, todo))


def _parse_header(prefix, total_size, name):
    """Validate the header at the start of a file of `total_size` bytes, given at least its first 8 + N bytes.
    Returns ({name: (dtype, shape, (begin, end))} in data order, metadata, start of the data)."""
    truncated = "the file was cut short (an interrupted save, copy or download): copy it again or save it again"
    if total_size < 8:
        _fail(name, "only %d bytes, but a safetensors file starts with an 8-byte header length" % total_size,
              truncated)
    (n,) = struct.unpack_from("<Q", prefix, 0)
    if n > MAX_HEADER_SIZE:
        _fail(name, "bad header length %d (more than %d): not a safetensors file, or damaged"
              % (n, MAX_HEADER_SIZE), "check that this is a .safetensors file, or save it again")
    if 8 + n > total_size:
        _fail(name, "header length %d runs past the end of the file (%d bytes)" % (n, total_size), truncated)
    try:
        text = bytes(prefix[8:8 + n]).decode("utf-8")
        if not text.lstrip().startswith("{"):
            raise ValueError("the header does not start with '{'")
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except ValueError as e:  # UnicodeDecodeError and json.JSONDecodeError are ValueErrors
        _fail(name, "header is not valid JSON (%s)" % e)
    if not isinstance(header, dict):
        _fail(name, "header is JSON but not an object")

    metadata = header.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        _fail(name, "%r must map strings to strings" % METADATA_KEY)
    data_size = total_size - 8 - n
    entries = []
    for key, info in header.items():
        where = "tensor %r" % key
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            _fail(name, "%s: expected exactly dtype, shape and data_offsets, got %r" % (where, info))
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_SIZES:
            _fail(name, "%s: unknown dtype %r (supported: %s)" % (where, dtype, ", ".join(DTYPE_SIZES)),
                  "convert the checkpoint to a supported dtype such as F32")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            _fail(name, "%s: bad shape %r" % (where, shape))
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            _fail(name, "%s: bad data_offsets %r" % (where, offsets))
        begin, end = offsets
        if end - begin != _numel(shape) * DTYPE_SIZES[dtype]:
            _fail(name, "%s: data_offsets %r hold %d bytes, but shape %r of %s needs %d"
                  % (where, offsets, end - begin, shape, dtype, _numel(shape) * DTYPE_SIZES[dtype]))
        if end > data_size:
            _fail(name, "%s: data_offsets %r run past the end of the data (%d bytes)" % (where, offsets, data_size),
                  truncated)
        entries.append((begin, end, key, dtype, tuple(shape)))

    entries.sort()
    pos = 0
    for begin, end, key, _, _ in entries:
        if begin < pos:
            _fail(name, "tensor %r: data_offsets [%d, %d] overlap the previous tensor (which ends at %d)"
                  % (key, begin, end, pos))
        if begin > pos:
            _fail(name, "tensor %r: gap of %d bytes before its data_offsets [%d, %d]"
                  % (key, begin - pos, begin, end))
        pos = end
    if pos != data_size:
        _fail(name, "%d bytes after the last tensor are not described by the header" % (data_size - pos))
    tensors = {key: (dtype, shape, (begin, end)) for begin, end, key, dtype, shape in entries}
    return tensors, metadata, 8 + n


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key %r" % next(k for k in keys if keys.count(k) > 1))
    return dict(pairs)


def _source_name(source, name):
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return "<safetensors bytes>"


def load_header(source, name=None):
    """Read only the header of a file path (or bytes): ({name: (dtype, shape, (begin, end))}, metadata).
    Offsets count from the start of the data, as in the file. Cheap for big files: reads 8 + N bytes."""
    name = _source_name(source, name)
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            total = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) == 8:
                prefix += f.read(min(struct.unpack("<Q", prefix)[0], MAX_HEADER_SIZE + 1))
    else:
        prefix = _as_bytes(source)
        total = len(prefix)
    tensors, metadata, _ = _parse_header(prefix, total, name)
    return tensors, metadata


def load(source, name=None):
    """Read a safetensors file from a path or from bytes: ({name: (dtype, shape, memoryview)}, metadata).
    Tensors come in file order; each memoryview is a flat byte slice of one buffer (no copy for bytes input)."""
    name = _source_name(source, name)
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            source = f.read()
    buf = _as_bytes(source)
    tensors, metadata, start = _parse_header(buf, len(buf), name)
    views = {key: (dtype, shape, buf[start + b:start + e]) for key, (dtype, shape, (b, e)) in tensors.items()}
    return views, metadata
