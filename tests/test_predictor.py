"""BoxPredictor: per-route crop plans, batching by crop size, and the exact-model setting."""

from __future__ import annotations

import copy

import pytest
import torch

from mal_cli import geometry
from mal_cli.device import resolve_device
from mal_cli.errors import InputError
from mal_cli.modeling import LabelerConfig, MaskLabeler
from mal_cli.predictor import BoxCrops, BoxPredictor, CropPlan, default_crop_sizes, make_crop_plan


@pytest.fixture(scope="module")
def model() -> MaskLabeler:
    torch.manual_seed(0)
    return MaskLabeler(LabelerConfig(backbone="vit_tiny_patch16_224", crop_size=64, decoder_dim=16)).eval()


def _image(seed: int = 0, hw: tuple[int, int] = (90, 120)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, *hw), generator=g, dtype=torch.uint8)


BOXES = [(5.0, 5.0, 25.0, 20.0), (10.0, 30.0, 80.0, 85.0), (40.0, 2.0, 60.0, 40.0), (0.0, 0.0, 120.0, 90.0)]
AREAS = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in BOXES]  # 300 (small), 3850, 760 (small), 10800 (large)


def test_plan_routes_like_the_decoder(model):
    plan = make_crop_plan(model, (32, 48, 64))
    areas = [0.0, 32.0**2 - 1, 32.0**2, 96.0**2 - 1, 96.0**2, 1e7]
    routes = model.decoder.route(torch.tensor(areas)).tolist()
    assert [plan.size_for(a) for a in areas] == [plan.sizes[r] for r in routes] == [32, 32, 48, 48, 64, 64]


def test_default_and_full_plans(model):
    assert default_crop_sizes(model) == (48, 64, 64)  # 3/4, 7/8 (rounded to the 16 px patch), 1 of 64
    assert make_crop_plan(model).sizes == (48, 64, 64)
    assert make_crop_plan(model).decoder_scales == (0.5, 1.0, 1.5)  # large boxes' convs at 3/4 of x2
    assert make_crop_plan(model, (32, 48, 64)).decoder_scales == (0.5, 1.0, 1.5)
    full = make_crop_plan(model, "full")
    assert full.sizes == (64, 64, 64) and full.decoder_scales is None  # the trained scales: the exact model
    with pytest.raises(InputError, match="multiples of the backbone's patch size 16"):
        make_crop_plan(model, (40, 64, 64))
    with pytest.raises(InputError, match="needs 3 sizes"):
        make_crop_plan(model, (64, 64))


def test_crops_are_grouped_by_size_in_box_order():
    plan = CropPlan((32.0**2, 96.0**2), (16, 32, 48))
    regions = [geometry.crop_region(b, geometry.Margins.uniform()) for b in BOXES]
    crops = plan.crops(_image(), regions, AREAS)
    assert crops.sizes == [16, 32, 16, 48]
    assert {s: tuple(t.shape) for s, t in crops.by_size.items()} == {
        16: (2, 3, 16, 16),
        32: (1, 3, 32, 32),
        48: (1, 3, 48, 48),
    }
    # each group holds its boxes in order: the second 16 px crop is box 2's
    expected = geometry.crop_images(_image(), [regions[2]], 16).round_().clamp_(0, 255).to(torch.uint8)
    assert torch.equal(crops.by_size[16][1:2], expected)
    both = BoxCrops.cat([crops, plan.crops(_image(1), regions[:1], AREAS[:1])])
    assert both.sizes == [16, 32, 16, 48, 16] and both.by_size[16].shape[0] == 3


ON_CPU_AND_GPU = pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])


@ON_CPU_AND_GPU
def test_predict_crops_returns_box_order_whatever_the_batching(model, device):
    predictor = BoxPredictor(copy.deepcopy(model), device, crop_sizes=(32, 48, 64))
    regions = predictor.regions(BOXES)
    crops = predictor.crop_plan.crops(_image(), regions, AREAS)
    areas = torch.tensor(AREAS)
    probs = predictor.predict_crops(crops, areas, batch_size=64)
    one_by_one = predictor.predict_crops(crops, areas, batch_size=1)
    assert probs.shape == (4, model.mask_size, model.mask_size)
    torch.testing.assert_close(probs, one_by_one, atol=2e-2, rtol=0)  # bf16 autocast: batch shape may round differently
    for i, (size, region, area) in enumerate(zip(crops.sizes, regions, AREAS)):
        crop = geometry.crop_images(_image(), [region], size).round_().clamp_(0, 255).to(torch.uint8)
        torch.testing.assert_close(probs[i], predictor.predict_probs(crop, torch.tensor([area]))[0], atol=2e-2, rtol=0)


def test_full_plan_is_the_exact_model(model):
    predictor = BoxPredictor(model, crop_sizes="full", amp=False)
    regions = predictor.regions(BOXES)
    crops = predictor.crop_plan.crops(_image(), regions, AREAS)
    assert set(crops.sizes) == {64}
    with torch.no_grad():
        direct = torch.sigmoid(model(crops.by_size[64].float(), torch.tensor(AREAS))[:, 0])
    torch.testing.assert_close(predictor.predict_crops(crops, torch.tensor(AREAS)), direct)
    # and the default plan really encodes small boxes at a smaller crop and runs large boxes' decoder coarser,
    # giving another answer for them only
    fast = BoxPredictor(model, amp=False)
    fast_probs = fast.predict_crops(fast.crop_plan.crops(_image(), regions, AREAS), torch.tensor(AREAS))
    assert not torch.allclose(fast_probs[0], direct[0], atol=1e-3)
    torch.testing.assert_close(fast_probs[1], direct[1])  # medium (7/8 of 64 rounds to 64): unchanged
    assert not torch.allclose(fast_probs[3], direct[3], atol=1e-3)
    with torch.no_grad():  # large: the same crop, the decoder at x1.5
        large = torch.sigmoid(model(crops.by_size[64][3:].float(), torch.tensor(AREAS[3:]), (0.5, 1.0, 1.5))[:, 0])
    torch.testing.assert_close(fast_probs[3:], large)


@pytest.mark.parametrize(
    "device, says",
    [
        ("cuda", "no usable CUDA GPU"),
        ("cuda:1", "no usable CUDA GPU"),
        ("gpu", "is not a device"),
        ("mps", "cpu or cuda"),
    ],
)
def test_resolve_device_explains_a_device_this_machine_lacks(monkeypatch, device, says):

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match=says):
        resolve_device(device)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_resolve_device_checks_the_cuda_index(monkeypatch):

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(InputError, match="2 CUDA devices"):
        resolve_device("cuda:2")


@pytest.mark.slow
@ON_CPU_AND_GPU
def test_compiled_blocks_are_one_graph_with_the_eager_probabilities(model, device):
    from torch._dynamo.utils import counters

    regions = BoxPredictor(model).regions(BOXES)
    eager = BoxPredictor(copy.deepcopy(model), device, crop_sizes=(32, 48, 64))
    crops = eager.crop_plan.crops(_image(), regions * 2, AREAS * 2)  # 4, 2 and 2 crops of 32, 48 and 64 px
    areas = torch.tensor(AREAS * 2)
    compiled_model = copy.deepcopy(model)
    names = list(compiled_model.state_dict())
    torch._dynamo.reset()
    counters.clear()
    compiled = BoxPredictor(compiled_model, device, crop_sizes=(32, 48, 64), compile=True)
    assert list(compiled_model.state_dict()) == names  # checkpoints written from it keep their keys
    for batch_size in (64, 2):  # three crop sizes, batches of 4 and 2: four (batch, tokens) shapes
        torch.testing.assert_close(
            compiled.predict_crops(crops, areas, batch_size),
            eager.predict_crops(crops, areas, batch_size),
            atol=2e-2,
            rtol=0,
        )
    # Dynamic shapes: no compile per crop size or batch (a batch of 1 would get one more: torch specialises size 1).
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.cuda
def test_a_gpu_queues_the_work_and_gives_the_cpus_probabilities(model):
    """On a GPU, `submit_crops` returns before the model has run (an event to wait on); the result lands in
    page-locked CPU memory and agrees with the CPU's probabilities: bf16 to rounding, fp32 closely."""
    cpu = BoxPredictor(copy.deepcopy(model), crop_sizes=(32, 48, 64))
    gpu = BoxPredictor(copy.deepcopy(model), "cuda", crop_sizes=(32, 48, 64))
    crops = cpu.crop_plan.crops(_image(), cpu.regions(BOXES) * 3, AREAS * 3)
    areas = torch.tensor(AREAS * 3)
    pending = gpu.submit_crops(crops.pin_memory(), areas, batch_size=2)  # pinned, as the label loader's pin thread does
    assert pending._ready is not None
    probs = pending.result()
    assert probs.device.type == "cpu" and probs.is_pinned()
    torch.testing.assert_close(probs, cpu.predict_crops(crops, areas, batch_size=2), atol=3e-2, rtol=0)
    cpu32 = BoxPredictor(copy.deepcopy(model), crop_sizes=(32, 48, 64), amp=False)
    gpu32 = BoxPredictor(copy.deepcopy(model), "cuda", crop_sizes=(32, 48, 64), amp=False)
    torch.testing.assert_close(gpu32.predict_crops(crops, areas), cpu32.predict_crops(crops, areas), atol=5e-3, rtol=0)
