"""One module per `mal` command: its options (Typer) and one call into the library; `cli.py` puts them together.

A command module declares its command with `@command(name, epilog=...)`: the registry below, read by `cli.py`,
so that importing a command module needs neither the app nor the other commands.
"""

from __future__ import annotations

from typing import Callable

COMMANDS: dict[str, tuple[dict, Callable]] = {}  # name -> (Typer command settings, function)


def command(name: str, **settings) -> Callable:
    def register(function: Callable) -> Callable:
        COMMANDS[name] = (settings, function)
        return function

    return register
