"""A segment's progress on stderr: a bar on a terminal; elsewhere (a log file, CI, nohup) one
plain line every LINE_SECS seconds and one when the segment ends. Their rate and ETA leave out
the chunks that compiled something (the first chunk of each length, the first evaluation).
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable

from tqdm.auto import tqdm

from grokjax.train.config import format_duration

# Progress on a stderr that is not a terminal: one line every LINE_SECS seconds. The rate (and
# the ETA) counts the chunks of the last RATE_WINDOW_SECS seconds that compiled nothing.
LINE_SECS = 30.0
RATE_WINDOW_SECS = 300.0

class Throughput:
    """Training steps per second, leaving out the time spent compiling.

    `mark(now, step)` is called each time a chunk has finished; `compiled()` when the work up to
    the next mark includes a compilation (the first dispatch of a chunk length, the first
    evaluation), and that interval is left out, as is everything before the first mark (loading,
    restoring, the first compilation). The rate is the steps over the seconds of the kept
    intervals of the last `window` seconds (the latest one always counts); None until one is kept.
    """

    def __init__(self, window: float = RATE_WINDOW_SECS):
        self.window = window
        self._last: tuple[float, int] | None = None
        self._compiling = False
        self._kept: deque[tuple[float, int]] = deque()  # (seconds, steps) of each kept interval
        self._seconds, self._steps = 0.0, 0

    def compiled(self) -> None:
        self._compiling = True

    def mark(self, now: float, step: int) -> None:
        last, self._last = self._last, (now, step)
        compiling, self._compiling = self._compiling, False
        if last is None or compiling or now <= last[0]:
            return
        self._kept.append((now - last[0], step - last[1]))
        self._seconds += now - last[0]
        self._steps += step - last[1]
        while len(self._kept) > 1 and self._seconds - self._kept[0][0] >= self.window:
            seconds, steps = self._kept.popleft()
            self._seconds -= seconds
            self._steps -= steps

    @property
    def rate(self) -> float | None:
        return self._steps / self._seconds if self._kept else None


def eta_text(step: int, total: int, rate: float | None) -> str:
    """`ETA 2h05m` for the steps left at `rate` steps/s; `ETA -` while no rate is known."""
    if rate is None or rate <= 0:
        return "ETA -"
    return f"ETA {format_duration(max(total - step, 0) / rate)}"


def _speed_text(rate: float | None) -> str:
    if rate is None:
        return "- steps/s"
    return f"{rate:,.0f} steps/s" if rate >= 100 else f"{rate:.3g} steps/s"


def progress_line(name: str, step: int, total: int, rate: float | None, postfix: str = "", *,
                  end: str | None = None) -> str:
    """One plain progress line, e.g.
    `r: step 40,960/10,000,000 (0.4%) | 1,234 steps/s | ETA 2h14m | test acc 0.8123 a1 3.41 ...`.

    end: in place of the ETA, how the segment ended (`done in 5m03s`, `paused after 1h00m`).
    """
    pct = 100.0 * step / total if total > 0 else 100.0
    parts = [f"{name}: step {step:,}/{total:,} ({pct:.1f}%)", _speed_text(rate), end or eta_text(step, total, rate)]
    return " | ".join(parts + ([postfix] if postfix else []))


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class Progress:
    """A segment's progress on `stream` (default stderr).

    On a terminal, a tqdm bar that shows `Throughput`'s rate and ETA; elsewhere (a log file, CI,
    nohup) one `progress_line` every `every` seconds and one when the segment ends. With
    `enabled` False (the `progress` config field), nothing.
    """

    def __init__(self, total: int, initial: int, name: str, *, enabled: bool, stream=None,
                 clock: Callable[[], float] = time.monotonic, every: float = LINE_SECS):
        self.total, self.first, self.step, self.name = total, initial, initial, name
        self.enabled, self.clock, self.every = enabled, clock, every
        self.stream = sys.stderr if stream is None else stream
        self.throughput = Throughput()
        self.postfix = ""
        self.started = self.printed = clock()
        self.bar = None
        if enabled and _isatty(self.stream):
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc=name, file=self.stream,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
            self.bar.set_postfix_str(self._stats(), refresh=False)

    def _stats(self) -> str:
        rate = self.throughput.rate
        parts = [_speed_text(rate), eta_text(self.step, self.total, rate)]
        return ", ".join(parts + ([self.postfix] if self.postfix else []))

    def compiled(self) -> None:
        """The work up to the next `update` includes a compilation: it stays out of the rate."""
        self.throughput.compiled()

    def update(self, n: int) -> None:
        """`n` more steps are done."""
        if not self.enabled:
            return
        self.step += n
        now = self.clock()
        self.throughput.mark(now, self.step)
        if self.bar is not None:
            self.bar.set_postfix_str(self._stats(), refresh=False)
            self.bar.update(n)
        elif now - self.printed >= self.every:
            self.printed = now
            self._print(progress_line(self.name, self.step, self.total, self.throughput.rate, self.postfix))

    def set_postfix(self, text: str) -> None:
        """The latest test accuracy and the monitor's summary, shown from now on."""
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(self._stats(), refresh=False)

    def close(self, end: str) -> None:
        """Ends the segment's progress; `end` (done, paused, stopped) says how, on the last line."""
        if self.bar is not None:
            self.bar.close()
            return
        if not self.enabled:
            return
        elapsed = self.clock() - self.started
        rate = self.throughput.rate
        if rate is None and elapsed > 0 and self.step > self.first:
            rate = (self.step - self.first) / elapsed
        how = f"done in {format_duration(elapsed)}" if end == "done" else f"{end} after {format_duration(elapsed)}"
        self._print(progress_line(self.name, self.step, self.total, rate, self.postfix, end=how))

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)
