"""`--device`: 'auto' (CUDA when there is one), 'cpu', 'cuda' or 'cuda:N', checked against this machine."""

from __future__ import annotations

import torch

from mal_cli.errors import InputError


def resolve_device(device: str) -> torch.device:
    """A device this machine has, else an InputError that says what it has."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device '{device}' is not a device: use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"--device {device}: this machine has no usable CUDA GPU (torch {torch.__version__}); "
                f"use --device cpu or auto"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise InputError(f"--device {device}: there are {count} CUDA devices (cuda:0 to cuda:{count - 1})")
    elif resolved.type != "cpu":
        raise InputError(f"--device {device}: mal runs on cpu or cuda")
    return resolved
