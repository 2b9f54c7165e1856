"""Safetensors weights read and written one tensor at a time, and the safety rules for a weights folder.

Why not `safetensors.torch.load_file` / `save_file`: both hold a whole shard in memory (save_file also builds the
serialized bytes as one more copy), and `safe_open` maps the file so every tensor read stays in the process's RSS
until the shard is closed. A merge of NeoX-20B must stay near one tensor plus the adapter, so the merge reads each
tensor with a plain file read at its offset and writes the output header first (dtypes and shapes are known in
advance), then each tensor's bytes as soon as it is merged. The format is the documented one (8-byte little-endian
header length, JSON header padded to 8 bytes, contiguous data); the merge's numerical gate reads the result back
through transformers, which checks it.

Rules for a folder we are given (the threats in ARCHITECTURE.md):
- only safetensors, unless the user allows pickles explicitly; then `torch.load(weights_only=True)`;
- every file a shard index names must lie inside the folder (no `../`, no absolute path, no symlink out);
- a header whose offsets run outside the file, overlap or leave gaps, whose span for a tensor is not its shape x
  dtype size, or that leaves bytes after the last tensor is refused (IntegrityError, exit 3);
- symlinks are allowed only as the Hugging Face cache makes them: from `snapshots/<rev>/` into the same repository's
  `blobs/` (training reads that layout too).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import IntegrityError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_HEADER_BYTES = 100 * 2**20

DTYPE_NAMES = {  # safetensors name -> torch dtype name
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name (F32, BF16, ...)
    shape: tuple[int, ...]
    begin: int  # byte offsets in the data section
    end: int


class ShardReader:
    """One safetensors file: its header, and tensors read on demand (plain reads, no memory map)."""

    def __init__(self, path: Path):
        self.path = path
        self.file = path.open("rb")
        size = path.stat().st_size
        try:
            (header_len,) = struct.unpack("<Q", self.file.read(8))
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {header_len} does not fit the file ({size} bytes)")
            header = json.loads(self.file.read(header_len))
        except (struct.error, ValueError) as err:
            self.file.close()
            raise IntegrityError(f"{path}: not a valid safetensors file ({err})") from None
        self.data_start = 8 + header_len
        self.metadata = header.pop("__metadata__", None) or {}
        try:
            self.tensors = {
                name: TensorInfo(name, e["dtype"], tuple(e["shape"]), *e["data_offsets"]) for name, e in header.items()
            }
        except (KeyError, TypeError, ValueError) as err:
            self.file.close()
            raise IntegrityError(f"{path}: not a valid safetensors header ({type(err).__name__}: {err})") from None
        try:
            self._check(size - self.data_start)
        except IntegrityError:
            self.file.close()
            raise

    def _check(self, data_size: int) -> None:
        """Every tensor's span is exactly its shape x dtype size, spans tile the data with no gap or overlap, and
        nothing follows the last one: a loader that trusts any of these reads garbage or past the file."""
        position = 0
        for info in sorted(self.tensors.values(), key=lambda t: t.begin):
            if info.dtype not in DTYPE_NAMES:
                raise IntegrityError(f"{self.path}: tensor {info.name} has unknown dtype {info.dtype}")
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info.shape):
                raise IntegrityError(
                    f"{self.path}: tensor {info.name} has shape {list(info.shape)}; the file is corrupt"
                )
            if info.begin != position or info.end < info.begin or info.end > data_size:
                raise IntegrityError(
                    f"{self.path}: tensor {info.name} has offsets {info.begin}..{info.end} that overlap, "
                    f"leave a gap or run past the data ({data_size} bytes); the file is corrupt"
                )
            expected = _numel(info.shape) * DTYPE_BYTES[info.dtype]
            if info.end - info.begin != expected:
                raise IntegrityError(
                    f"{self.path}: tensor {info.name} is {info.dtype} {list(info.shape)} ({expected} bytes) "
                    f"but spans {info.end - info.begin} bytes; the file is corrupt"
                )
            position = info.end
        if position != data_size:
            raise IntegrityError(
                f"{self.path}: {data_size - position} bytes after the last tensor; the file is corrupt "
                "or was appended to"
            )

    def read(self, name: str):
        import torch

        info = self.tensors[name]
        dtype = getattr(torch, DTYPE_NAMES[info.dtype])
        if info.end == info.begin:
            return torch.empty(info.shape, dtype=dtype)
        self.file.seek(self.data_start + info.begin)
        buffer = bytearray(info.end - info.begin)
        self.file.readinto(buffer)
        return torch.frombuffer(buffer, dtype=dtype).reshape(info.shape)

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ShardWriter:
    """Writes a safetensors file whose tensors (names, dtypes, shapes) are declared up front, then filled in order."""

    def __init__(self, path: Path, layout: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None):
        import torch

        header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
        self.order = []
        for name, dtype, shape in layout:
            nbytes = _numel(shape) * torch.empty(0, dtype=getattr(torch, DTYPE_NAMES[dtype])).element_size()
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.order.append((name, nbytes))
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.path = path
        self.file = path.open("wb")
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)
        self.size = 8 + len(encoded) + offset
        self.next = 0

    def write(self, name: str, tensor) -> None:
        expected, nbytes = self.order[self.next]
        if name != expected or tensor.numel() * tensor.element_size() != nbytes:
            raise RuntimeError(f"{self.path}: wrote {name} where {expected} ({nbytes} bytes) was declared")
        if nbytes:
            self.file.write(memoryview(tensor.contiguous().view(-1).view(_uint8()).numpy()))
        self.next += 1

    def close(self) -> None:
        self.file.close()
        if self.next != len(self.order):
            raise RuntimeError(f"{self.path}: {len(self.order) - self.next} declared tensors were never written")


def dtype_name(torch_dtype) -> str:
    """The safetensors name of a torch dtype (torch.bfloat16 -> BF16)."""
    wanted = str(torch_dtype).removeprefix("torch.")
    return next(name for name, torch_name in DTYPE_NAMES.items() if torch_name == wanted)


def weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a model folder, in index order, after the safety rules above."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        return _indexed(folder, index)
    if (folder / SAFETENSORS_SINGLE).is_file():
        return [folder / SAFETENSORS_SINGLE]
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles and not allow_pickle:
        raise IntegrityError(
            f"{folder}: only pickled weights ({', '.join(p.name for p in pickles)}); unpickling can run "
            "arbitrary code. Convert them to safetensors, or pass allow_pickle=true to read them with "
            "torch.load(weights_only=True)"
        )
    if pickles:
        return pickles
    raise IntegrityError(f"{folder}: no model weights ({SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX})")


def inside(folder: Path, name: str) -> Path:
    """folder/name, refused when name leads outside folder (absolute, `..`, or a symlink pointing out); a snapshot of
    the Hugging Face cache may link into its own repository's blobs/."""
    candidate = folder / name
    allowed = [folder.resolve()]
    if folder.parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<rev>/file -> ../../blobs/<sha>
        allowed.append((folder.parent.parent / "blobs").resolve())
    resolved = candidate.resolve()
    if Path(name).is_absolute() or ".." in Path(name).parts or not any(resolved.is_relative_to(a) for a in allowed):
        raise IntegrityError(
            f"{folder}: refers to '{name}', which lies outside the model folder; refusing to read it "
            "(a crafted index can make a loader read weights from anywhere)"
        )
    return candidate


def _indexed(folder: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError) as err:
        raise IntegrityError(f"{index}: not a valid shard index ({err})") from None
    files = list(dict.fromkeys(weight_map.values()))
    paths = [inside(folder, name) for name in files]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise IntegrityError(f"{index}: names shard(s) that are not there: {', '.join(missing)}")
    return paths


def load_pickled(path: Path) -> dict:
    """A pickled state dict, read with weights_only=True (tensors and plain containers only; no code runs)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - weights_only refuses anything that is not plain tensors: say so
        raise IntegrityError(f"{path}: refused by torch.load(weights_only=True): {err}") from None


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _uint8():
    import torch

    return torch.uint8


def open_weights(path: Path):
    """A reader for one weights file: safetensors, or a pickled shard (allow_pickle=true only)."""
    return ShardReader(path) if path.suffix == ".safetensors" else _PickledShard(path)


class _PickledShard:
    """A pickled shard (allow_pickle=true only), read with weights_only=True, behind ShardReader's interface."""

    def __init__(self, path: Path):
        self.state = load_pickled(path)
        self.tensors = {
            name: TensorInfo(name, dtype_name(t.dtype), tuple(t.shape), 0, 0) for name, t in self.state.items()
        }

    def read(self, name: str):
        return self.state[name]

    def close(self) -> None:
        self.state = {}
