"""MAL's attention mask decoder: an instance vector K dotted with per-pixel features V gives mask logits."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mal_cli.routes import area_routes

# Routing by the box's original area: COCO's small/medium/large limits. Bins are [0, 32^2), [32^2, 96^2),
# [96^2, inf): MAL's strict inequalities left areas of exactly 32^2 and 96^2 unrouted.
DEFAULT_AREA_BINS = (32.0**2, 96.0**2)
DEFAULT_ROUTE_SCALES = (0.5, 1.0, 2.0)


class MaskDecoder(nn.Module):
    """K = MLP(mean of the feature map); V = 4 x (3x3 conv + ReLU) with a 2x upsample before the last.

    Logits are <K, V> per pixel, resized to `output_stride`x the token grid (4x: 64x64 for a 16x16 grid).
    The feature map is first rescaled per sample by its route (x0.5 / x1 / x2 for small / medium /
    large boxes), so large objects get finer masks and small ones do not pay for them.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int = 256,
        num_convs: int = 4,
        area_bins: Sequence[float] = DEFAULT_AREA_BINS,
        route_scales: Sequence[float] = DEFAULT_ROUTE_SCALES,
        output_stride: int = 4,
    ):
        super().__init__()
        if len(route_scales) != len(area_bins) + 1:
            raise ValueError("route_scales needs one entry more than area_bins")
        self.instance_mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))
        self.pixel_convs = nn.ModuleList(
            nn.Conv2d(in_dim if i == 0 else dim, dim, kernel_size=3, padding=1) for i in range(num_convs)
        )
        self.area_bins = tuple(float(a) for a in area_bins)
        self.route_scales = tuple(float(s) for s in route_scales)
        self.output_stride = output_stride

    def route(self, box_areas: torch.Tensor) -> torch.Tensor:
        """Route index per sample: the number of bin limits its area reaches (areas == limit go up)."""
        return area_routes(box_areas, self.area_bins)  # the rule the crop plan uses too

    def pixel_features(self, features: torch.Tensor, scale: float) -> torch.Tensor:
        size = (max(1, round(features.shape[-2] * scale)), max(1, round(features.shape[-1] * scale)))
        x = (
            features
            if size == tuple(features.shape[-2:])
            else F.interpolate(features, size=size, mode="bilinear", align_corners=False)
        )
        if self.pixel_convs[0].weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)  # match NHWC weights (see BoxPredictor)
        for i, conv in enumerate(self.pixel_convs):
            if i == len(self.pixel_convs) - 1:
                x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = F.relu(conv(x), inplace=True)
        return x

    def forward(
        self,
        features: torch.Tensor,
        box_areas: torch.Tensor,
        grid_size: int | None = None,
        route_scales: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """features (B, D, h, w), box_areas (B,) in original image pixels -> logits (B, 1, 4g, 4g).

        g = `grid_size`, the token grid the model was trained at (default h). Features from a smaller crop
        (h < g) are routed as if they came from a g x g grid: a small box's x0.5 route on a 16x16 grid and
        x1 on an 8x8 grid (a crop half the size) both run the convs at 8x8. `route_scales` (default: the
        trained `self.route_scales`) lets labelling run a route's convs at another resolution; the output
        size is the same.
        """
        b, _, h, w = features.shape
        grid = grid_size or h
        out_size = (grid * self.output_stride, grid * self.output_stride)
        instance = self.instance_mlp(features.mean(dim=(2, 3)))
        # Routed where the areas are: areas on the CPU make the split a CPU decision (torch.nonzero on a GPU
        # tensor would wait for the encoder to finish before the decoder could be queued).
        routes = self.route(box_areas.float())
        logits = features.new_empty((b, 1, *out_size))
        for r, scale in enumerate(self.route_scales if route_scales is None else route_scales):
            idx = torch.nonzero(routes == r).flatten()
            if idx.numel() == 0:
                continue
            if features.is_cuda and not idx.is_cuda:
                idx = idx.pin_memory()  # a copy from pageable memory may wait for the stream
            idx = idx.to(features.device, non_blocking=True)
            pixels = self.pixel_features(features[idx], scale * grid / h)
            group = torch.einsum("bc,bchw->bhw", instance[idx], pixels).unsqueeze(1)
            if group.shape[-2:] != out_size:
                group = F.interpolate(group, size=out_size, mode="bilinear", align_corners=False)
            logits[idx] = group.to(logits.dtype)
        return logits
