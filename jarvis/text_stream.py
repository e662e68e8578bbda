"""Turning a stream of generated tokens into client-visible text, for any engine.

`TokenTextDecoder` joins token bytes into text without splitting a UTF-8
character across chunks. `StopSequenceMatcher` cuts the text at the first stop
sequence and holds back any tail that could still become one, so a streamed
response never shows part of a stop string.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TokenTextDecoder:
    """Incremental bytes → str; an unfinished multi-byte character waits for its next token."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, piece: bytes) -> str:
        return self._decoder.decode(piece)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopSequenceMatcher:
    """Feed text as it is generated; get back what can be shown and whether a stop matched."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False
        #: The stop sequence that ended the text (the earliest in it), once `stopped`.
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Returns the text that is now safe to emit; sets `stopped` when a stop sequence appeared."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buffer = self._pending + text
        found = [(at, stop) for stop in self.stops if (at := buffer.find(stop)) >= 0]
        if found:
            at, self.matched = min(found, key=lambda hit: hit[0])
            self.stopped = True
            self._pending = ""
            return buffer[:at]
        hold = self._held_tail(buffer)
        self._pending = buffer[len(buffer) - hold:] if hold else ""
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        """The held-back tail, once generation ended without completing a stop sequence."""
        tail, self._pending = self._pending, ""
        return "" if self.stopped else tail

    def _held_tail(self, buffer: str) -> int:
        """The length of the longest end of `buffer` that begins a stop sequence (it may still become one).
        Only an end that starts with a stop's first character can: those are the only ones tried."""
        held = 0
        for stop in self.stops:
            at = buffer.find(stop[0], max(0, len(buffer) - len(stop) + 1))
            while at >= 0 and len(buffer) - at > held:
                if stop.startswith(buffer[at:]):
                    held = len(buffer) - at
                    break
                at = buffer.find(stop[0], at + 1)
        return held
