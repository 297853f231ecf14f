"""The console every command prints to, and the one way bad input ends a command.

Below every folder: a launcher, a command and the report's messages print through the same
console (tests narrow it once), and bad input anywhere is one red line and exit 2.
"""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)


def fail_input(error: Exception) -> NoReturn:
    """Bad input: one clear message, exit code 2, no traceback."""
    # escaped: a key such as train.[lr] in the message must print as written, not as markup
    err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)
