"""Progress reporting for long build steps: rich bars for people, silence for libraries and tests."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

__all__ = ["NullProgress", "Progress", "RichProgress"]


class Progress(Protocol):
    """What the pipeline reports to: named steps and counted bars."""

    def step(self, message: str) -> None:
        """A step started (one line)."""
        ...

    def bar(self, description: str, total: int) -> contextlib.AbstractContextManager[Callable[[int], None]]:
        """A bar; the yielded callable sets how many of ``total`` are done."""
        ...


class NullProgress:
    """Reports nothing."""

    def step(self, message: str) -> None:
        """Ignore the step."""

    @contextlib.contextmanager
    def bar(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """A bar that draws nothing."""
        yield lambda done: None


class RichProgress:
    """Bars and step lines on stderr with rich (plain lines when stderr is not a terminal)."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console: Any = Console(stderr=True)

    def step(self, message: str) -> None:
        """Print the step."""
        self.console.print(f"[bold cyan]•[/] {message}")

    @contextlib.contextmanager
    def bar(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """A live bar when interactive; a start/end line otherwise."""
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        if not self.console.is_terminal:
            self.console.print(f"  {description} ({total})…")
            yield lambda done: None
            return
        with Progress(
            TextColumn("  {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        ) as prog:
            task = prog.add_task(description, total=total)
            yield lambda done: prog.update(task, completed=done)
