"""Per-night progress of ``vampd reprocess``: files, sets, failures, ETA (rich)."""

from __future__ import annotations

import time

__all__ = ["NightProgress", "summary_line"]


def _numbers(night) -> dict:
    c, s = night.counts, night.sets
    return {
        "total": len(night.paths),
        "done": c.get("done", 0),
        "finished": c.get("done", 0) + c.get("parked", 0) + c.get("ignored", 0),
        "failed": c.get("parked", 0) + c.get("failed", 0),
        "running": len(night.pool.jobs),
        "sets": s.get("complete", 0),
        "broken": s.get("broken", 0),
    }


def summary_line(night) -> str:
    """One line per night for the end of the run (and for logs without a terminal)."""
    n = _numbers(night)
    wall = (night.t_end or time.time()) - night.t_start
    fin = " finalized" if night.finalized and night.final and "error" not in night.final else ""
    if night.stopped:
        fin = f" STOPPED ({night.stopped}; rerun to finish)"
    return (
        f"{night.label}: {n['done']}/{n['total']} done, {n['failed']} failed, "
        f"{n['sets']} set(s) complete, {n['broken']} broken, {wall:.1f} s{fin} -> {night.outdir}"
    )


class NightProgress:
    """A rich progress bar per night, refreshed from each night's ledger at most every ``every`` s."""

    def __init__(self, console=None, every: float = 0.5):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.every = every
        self._last = 0.0
        self.tasks: dict[str, int] = {}
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "files  {task.fields[running]} running  [green]{task.fields[sets]} sets[/]"
                "  [red]{task.fields[failed]} failed[/]  {task.fields[state]}"
            ),
            TimeRemainingColumn(),
            console=console,
        )

    def __enter__(self) -> NightProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def __call__(self, nights, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < self.every:
            return
        self._last = now
        for night in nights:
            if not night.closed:
                night.update_counts()
            n = _numbers(night)
            state = (
                "finalized"
                if night.finalized
                else "STOPPED"
                if night.stopped
                else "running"
                if n["running"]
                else "queued"
            )
            if night.label not in self.tasks:
                self.tasks[night.label] = self.progress.add_task(
                    night.label, total=n["total"], running=0, sets=0, failed=0, state=""
                )
            self.progress.update(
                self.tasks[night.label],
                completed=n["finished"],
                running=n["running"],
                sets=n["sets"],
                failed=n["failed"],
                state=state,
            )
