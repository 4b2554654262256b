"""Stop strings over streamed text: what may be sent now, and where the answer ends.

Why hold text back: a stop string can be split across tokens (``"\\n\\n"`` as two ``"\\n"``
tokens, or ``"END"`` as ``"EN"`` + ``"D"``), and text once streamed cannot be taken back. So the
last ``len(longest stop) - 1`` characters wait until the next text shows they begin no stop
string (vLLM's detokenizer does the same). The answer ends at the first stop string found, which
is cut off (or kept, with ``include_stop_str_in_output``), as the OpenAI API and vLLM define
``stop``; what is held back when the answer ends otherwise is sent then.
"""

from __future__ import annotations


class StopStrings:
    """The text of an answer as pieces that never hold a (part of a) stop string.

    Example::

        stops = StopStrings(["\\n\\n"])
        stops.push("a\\n")      # -> "a"  ("\\n" may begin a stop string: held back)
        stops.push("\\nb")      # -> ""   and stops.stopped == "\\n\\n"
    """

    def __init__(self, stops: list[str], include_stop: bool = False):
        self.stops = [stop for stop in stops if stop]
        self.include_stop = include_stop
        self._hold = max((len(stop) for stop in self.stops), default=1) - 1
        self._pending = ""                 # text not sent yet: it may begin a stop string
        self.stopped: str | None = None    # the stop string that ended the answer

    def push(self, text: str) -> str:
        """Adds ``text``; returns what may be sent now. Once a stop string is found (:attr:`stopped`),
        returns the text before it (with it, if ``include_stop``) and nothing after."""
        if self.stopped is not None:
            return ""
        pending = self._pending + text
        # The earliest stop string ending anywhere in the new text (one may start in the held part).
        found = min(((pending.find(stop), stop) for stop in self.stops if stop in pending), default=None)
        if found is not None:
            at, stop = found
            self.stopped, self._pending = stop, ""
            return pending[:at + len(stop)] if self.include_stop else pending[:at]
        keep = min(self._hold, len(pending))
        self._pending = pending[len(pending) - keep:]
        return pending[:len(pending) - keep]

    def flush(self) -> str:
        """The text held back, at the end of an answer that no stop string ended."""
        pending, self._pending = self._pending, ""
        return "" if self.stopped is not None else pending
