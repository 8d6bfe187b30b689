"""mal_cli.modeling: output shapes, area routing, the <K, V> decoder, backbone weight loading, export/load."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from mal_cli.errors import InputError
from mal_cli.modeling import LabelerConfig, MaskLabeler
from mal_cli.modeling.image_encoder import ImageEncoder, load_backbone_weights
from mal_cli.modeling.labeler import atomic_torch_save, export_labeler, load_labeler, read_checkpoint

BACKBONE = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def model() -> MaskLabeler:
    torch.manual_seed(0)
    return MaskLabeler(LabelerConfig(backbone=BACKBONE, crop_size=64, decoder_dim=32)).eval()


def _crops(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 255


@pytest.mark.parametrize("crop_size", [32, 64])
def test_output_shape_is_4x_the_token_grid(crop_size):
    torch.manual_seed(0)
    m = MaskLabeler(LabelerConfig(backbone=BACKBONE, crop_size=crop_size, decoder_dim=16)).eval()
    h = crop_size // 16
    with torch.no_grad():
        out = m(_crops(3, crop_size), torch.tensor([100.0, 5000.0, 20000.0]))
    assert out.shape == (3, 1, 4 * h, 4 * h)
    assert m.mask_size == 4 * h
    assert torch.isfinite(out).all()


def test_crop_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(InputError, match="multiple of the backbone's patch size"):
        MaskLabeler(LabelerConfig(backbone=BACKBONE, crop_size=40))


def test_routing_limits_go_up_and_every_sample_is_routed(model):
    decoder = model.decoder
    areas = torch.tensor([0.0, 32.0**2 - 1, 32.0**2, 96.0**2 - 1, 96.0**2, 1e7])
    assert decoder.route(areas).tolist() == [0, 0, 1, 1, 2, 2]
    torch.manual_seed(1)
    features = torch.randn(len(areas), model.encoder.embed_dim, 4, 4)
    with torch.no_grad():
        logits = decoder(features, areas)
    assert logits.shape == (6, 1, 16, 16) and torch.isfinite(logits).all()

    def by_scale(i: int, scale: float) -> torch.Tensor:
        f = features[i : i + 1]
        k = decoder.instance_mlp(f.mean(dim=(2, 3)))
        v = decoder.pixel_features(f, scale)
        out = torch.einsum("bc,bchw->bhw", k, v).unsqueeze(1)
        return F.interpolate(out, size=(16, 16), mode="bilinear", align_corners=False) if out.shape[-1] != 16 else out

    with torch.no_grad():
        for i, scale in enumerate([0.5, 0.5, 1.0, 1.0, 2.0, 2.0]):
            torch.testing.assert_close(logits[i : i + 1], by_scale(i, scale), atol=1e-5, rtol=1e-5)
        # the route really changes the output: area 32^2 is not computed as a small box
        assert not torch.allclose(logits[2:3], by_scale(2, 0.5), atol=1e-4)


def test_logits_are_the_inner_product_of_K_and_V(model):
    crops, areas = _crops(2), torch.tensor([500.0, 50000.0])
    with torch.no_grad():
        base = model(crops, areas)
        last = model.decoder.instance_mlp[-1]
        w, b = last.weight.clone(), last.bias.clone()
        try:
            last.weight.mul_(2)
            last.bias.mul_(2)
            doubled = model(crops, areas)
        finally:
            last.weight.copy_(w)
            last.bias.copy_(b)
    assert base.abs().max() > 0
    torch.testing.assert_close(doubled, 2 * base, atol=1e-5, rtol=1e-5)


def test_samples_are_independent_of_their_batch(model):
    crops, areas = _crops(4, seed=3), torch.tensor([10.0, 2000.0, 9216.0, 1024.0])
    with torch.no_grad():
        batched = model(crops, areas)
        single = torch.cat([model(crops[i : i + 1], areas[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)


# --- backbone weights ---------------------------------------------------------------------------------


def _saved_vit(tmp_path, img_size: int = 48, drop: tuple[str, ...] = (), wrap: bool = True):
    torch.manual_seed(7)
    src = timm.create_model(BACKBONE, pretrained=False, img_size=img_size)  # with its 1000-class head
    state = {k: v for k, v in src.state_dict().items() if k not in drop}
    path = tmp_path / "vit.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}} if wrap else state, path)
    return src.state_dict(), path


def test_load_backbone_weights_resamples_pos_embed_and_reports_keys(tmp_path):
    src, path = _saved_vit(tmp_path, img_size=48)  # a 3x3 token grid
    torch.manual_seed(0)
    encoder = ImageEncoder(BACKBONE, img_size=64)  # a 4x4 token grid
    assert src["pos_embed"].shape == (1, 1 + 9, 192) and encoder.vit.pos_embed.shape == (1, 1 + 16, 192)
    report = load_backbone_weights(encoder, path)
    own = encoder.vit.state_dict()
    assert report["unexpected"] == ["head.bias", "head.weight"]
    assert report["missing"] == [] and report["mismatched"] == []
    assert "pos_embed" in report["loaded"] and set(report["loaded"]) == set(own)
    expected_pos = resample_abs_pos_embed(src["pos_embed"], new_size=(4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(own["pos_embed"], expected_pos)
    torch.testing.assert_close(own["pos_embed"][:, :1], src["pos_embed"][:, :1])  # the class token is kept
    for key in ("blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "norm.bias", "cls_token"):
        torch.testing.assert_close(own[key], src[key])


def test_load_backbone_weights_reports_missing_keys(tmp_path):
    src, path = _saved_vit(tmp_path, img_size=64, drop=("norm.weight", "blocks.3.mlp.fc1.bias"), wrap=False)
    encoder = ImageEncoder(BACKBONE, img_size=64)
    before = encoder.vit.state_dict()["norm.weight"].clone()
    report = load_backbone_weights(encoder, path)
    assert report["missing"] == ["blocks.3.mlp.fc1.bias", "norm.weight"]
    assert "norm.weight" not in report["loaded"]
    torch.testing.assert_close(encoder.vit.state_dict()["norm.weight"], before)
    torch.testing.assert_close(encoder.vit.state_dict()["pos_embed"], src["pos_embed"])  # same grid: unchanged


def test_load_backbone_weights_rejects_foreign_files(tmp_path):
    encoder = ImageEncoder(BACKBONE, img_size=32)
    foreign = tmp_path / "foreign.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, foreign)
    with pytest.raises(InputError, match="matches"):
        load_backbone_weights(encoder, foreign)
    with pytest.raises(InputError, match="not found"):
        load_backbone_weights(encoder, tmp_path / "absent.pth")


# --- export / load ---------------------------------------------------------------------------------------


def test_export_and_load_round_trip(model, tmp_path):
    path = tmp_path / "labeler.pth"
    export_labeler(model, path, meta={"step": 3})
    ckpt = read_checkpoint(path)
    assert ckpt["meta"] == {"step": 3}
    assert all(v.dtype == torch.float16 for v in ckpt["model"].values() if v.is_floating_point())
    loaded = load_labeler(path)
    assert not loaded.training
    assert loaded.config == model.config
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    crops, areas = _crops(3, seed=5), torch.tensor([300.0, 3000.0, 30000.0])
    with torch.no_grad():
        ref, out = model(crops, areas), loaded(crops, areas)
    scale = ref.abs().max().item()
    assert scale > 0
    assert (out - ref).abs().max().item() <= 2e-2 * scale  # fp16 weights
    # and the weights are exactly the fp16-rounded originals
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v.half().float(), atol=0, rtol=0)


def test_load_labeler_training_checkpoint_picks_student_or_teacher(model, tmp_path):
    teacher = MaskLabeler(model.config)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(1.0)
    path = tmp_path / "checkpoint.pth"
    atomic_torch_save(
        {
            "format": "mal-labeler",
            "version": 1,
            "config": model.config.to_dict(),
            "student": model.state_dict(),
            "teacher": teacher.state_dict(),
        },
        path,
    )
    key = "decoder.instance_mlp.2.weight"
    torch.testing.assert_close(load_labeler(path).state_dict()[key], model.state_dict()[key])
    torch.testing.assert_close(load_labeler(path, use_teacher=True).state_dict()[key], teacher.state_dict()[key])


def test_read_checkpoint_rejects_other_files(tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(InputError, match="not a mal labeler checkpoint"):
        read_checkpoint(other)
    truncated = tmp_path / "trunc.pth"
    truncated.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(InputError, match="cannot read checkpoint"):
        read_checkpoint(truncated)


# --- smaller crops than the model's (per-route crop sizes) -------------------------------------------------


def test_encoder_at_a_smaller_crop_equals_a_vit_built_at_that_size(model):
    """The resampled position embedding is timm's own: a ViT created at 32 px with those weights agrees."""
    small = ImageEncoder(BACKBONE, 32)
    state = model.encoder.vit.state_dict()
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=(2, 2), num_prefix_tokens=1)
    small.vit.load_state_dict(state)
    images = _crops(2, size=32) / 255
    with torch.no_grad():
        features = model.encoder(images)
        expected = small(images)
    assert features.shape == (2, model.encoder.embed_dim, 2, 2)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the native size still takes timm's own path, unchanged
        torch.testing.assert_close(
            model.encoder(_crops(1) / 255),
            model.encoder._forward_features_at(_crops(1) / 255)[:, 1:].transpose(1, 2).reshape(1, -1, 4, 4),
            atol=1e-5,
            rtol=1e-5,
        )


def test_decoder_routes_a_half_size_grid_like_the_full_grid():
    """A small box's x0.5 route on a 16x16 grid = its x1 route on the 8x8 grid that downsampling gives:
    the decoder must rescale by route x reference grid / grid, and keep the reference output size."""
    torch.manual_seed(0)
    m = MaskLabeler(LabelerConfig(backbone=BACKBONE, crop_size=256, decoder_dim=16)).eval()
    full = torch.randn(3, m.encoder.embed_dim, 16, 16)
    half = F.interpolate(full, size=(8, 8), mode="bilinear", align_corners=False)
    small = torch.full((3,), 100.0)
    with torch.no_grad():
        k_full = m.decoder.instance_mlp(full.mean(dim=(2, 3)))
        k_half = m.decoder.instance_mlp(half.mean(dim=(2, 3)))
        ref = m.decoder(full, small)
        got = m.decoder(half, small, grid_size=16)
        # same V; K differs only through the mean of the features, so compare V through equal K
        assert got.shape == ref.shape == (3, 1, 64, 64)
        v_full = m.decoder.pixel_features(full, 0.5)
        v_half = m.decoder.pixel_features(half, 0.5 * 16 / 8)
    torch.testing.assert_close(v_half, v_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_half, k_full, atol=1e-4, rtol=1e-4)  # bilinear 2x down keeps the mean
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)
    # without the reference grid the half grid would run the convs at 4x4: a different (coarser) answer
    with torch.no_grad():
        wrong = m.decoder(half, small)
    assert wrong.shape == (3, 1, 32, 32)


def test_route_scales_given_at_call_time_are_a_decoder_built_with_them(model):
    """Labelling's plan runs a route's convs at another scale with the trained weights: the same as a model
    whose decoder was built with those scales, and the same output size."""
    crops, areas = _crops(3, seed=5), torch.tensor([100.0, 2000.0, 50000.0])
    config = dict(backbone=BACKBONE, crop_size=64, decoder_dim=32)
    coarser = MaskLabeler(LabelerConfig(**config, route_scales=(0.5, 1.0, 1.5))).eval()
    coarser.load_state_dict(model.state_dict())
    with torch.no_grad():
        given = model(crops, areas, (0.5, 1.0, 1.5))
        torch.testing.assert_close(given, coarser(crops, areas))
        trained = model(crops, areas)
    assert given.shape == trained.shape == (3, 1, 16, 16)
    torch.testing.assert_close(given[:2], trained[:2])  # small and medium: their scales did not change
    assert not torch.allclose(given[2], trained[2], atol=1e-4)


def test_decoder_routes_boxes_where_their_areas_are(model):
    # Areas on the CPU: routing never reads the features' device, so a GPU need not finish the encoder
    # before the decoder is queued. The meta device has no data: any read of it (torch.nonzero) fails.
    areas = torch.tensor([0.0, 32.0**2 - 1, 32.0**2, 96.0**2 - 1, 96.0**2, 1e7])
    decoder = MaskLabeler(LabelerConfig(backbone=BACKBONE, crop_size=64, decoder_dim=32)).decoder.to("meta")
    features = torch.empty(len(areas), model.encoder.embed_dim, 4, 4, device="meta")
    assert decoder(features, areas).shape == (6, 1, 16, 16)
    with pytest.raises(NotImplementedError):  # areas on the device: routed there, which reads its data
        decoder(features, areas.to("meta"))
