"""Box routes: small / medium / large by the box's area in original image pixels (COCO's limits 32², 96²).

The one rule the crop plan (which crop size a box is encoded at) and the decoder (which resolution its
convs run at) both use: a box's route is the number of limits its area reaches, so an area equal to a
limit goes up. Bins are [0, 32²), [32², 96²), [96², inf).
"""

from __future__ import annotations

import bisect
from typing import Any, Sequence

import numpy as np


def area_route(area: float, limits: Sequence[float]) -> int:
    """The route of one box area."""
    return bisect.bisect_right(limits, area)


def area_routes(areas: Any, limits: Sequence[float]) -> Any:
    """`area_route` of many areas: a torch tensor gives a tensor on its device, anything else a numpy array."""
    if type(areas).__module__.startswith("torch"):
        import torch

        return torch.bucketize(areas, torch.tensor(limits, device=areas.device, dtype=areas.dtype), right=True)
    return np.searchsorted(np.asarray(limits, dtype=np.float64), areas, side="right")
