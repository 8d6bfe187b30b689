"""The package layout's promises: what must not import torch, and the one area-route rule."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from mal_cli.modeling.mask_decoder import MaskDecoder
from mal_cli.predictor import CropPlan
from mal_cli.routes import area_route, area_routes

MINI16 = "tests/data/annotations_mini16.json"
IMAGES = "tests/data/images"


def test_box_method_and_post_processing_never_import_torch(tmp_path):
    """`mal label --method box` and the post-processing pool's modules run without torch (start-up, memory)."""
    code = (
        "import sys\n"
        "import mal_cli.labeling.postprocess, mal_cli.labeling.loader\n"
        "from mal_cli.cli import main\n"
        "try:\n"
        f"    main(['label', {MINI16!r}, '--images', {IMAGES!r}, '--out', {str(tmp_path / 'o.json')!r},\n"
        "          '--method', 'box', '--no-progress'])\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        "heavy = sorted(m for m in ('torch', 'timm') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "o.json").stat().st_size > 0


def test_crop_plan_and_decoder_route_every_area_alike():
    """One rule: an area equal to a limit goes up, in the crop plan (python floats) and the decoder (tensors)."""
    bins = (32.0**2, 96.0**2)
    areas = [0.0, 1.0, 1023.0, 1024.0, 1025.0, 9215.5, 9216.0, 9217.0, 1e9]
    decoder = MaskDecoder(in_dim=8, dim=8, area_bins=bins)
    plan = CropPlan(bins, (10, 20, 30))
    expected = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [area_route(a, bins) for a in areas] == expected
    assert decoder.route(torch.tensor(areas, dtype=torch.float64)).tolist() == expected
    assert area_routes(np.array(areas), bins).tolist() == expected
    assert [plan.size_for(a) for a in areas] == [(10, 20, 30)[r] for r in expected]
