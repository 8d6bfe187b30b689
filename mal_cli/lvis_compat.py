"""Make the `lvis` package (0.5.3) run on NumPy >= 1.24.

lvis 0.5.3 still calls `np.float`, an alias NumPy removed in 1.24. `apply()` restores the old
builtin aliases, only where they are missing, so nothing NumPy still defines is overridden.
"""

from __future__ import annotations

import numpy as np

_REMOVED_ALIASES = {"float": float, "int": int, "bool": bool, "object": object, "complex": complex, "str": str}


def apply() -> None:
    """Restore NumPy's removed builtin-type aliases (np.float, ...) if they are missing. Idempotent."""
    for name, builtin in _REMOVED_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, builtin)
