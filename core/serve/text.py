"""Token ids -> text deltas for one response: incremental UTF-8 and stop sequences.

A stop sequence can span several tokens, so text that might be the start of one is held back until
it is either completed (generation stops and the stop string is cut off) or ruled out.
"""

from __future__ import annotations

import codecs


class TextOut:
    def __init__(self, tokenizer, stop: list[str]):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # decoded text not emitted yet (a possible stop-sequence prefix)
        self.stopped_by: str | None = None

    def push(self, token: int) -> str:
        """Add a token; return the text that is now safe to emit ('' while held back)."""
        return self._feed(self.dec.decode(self.tok.token_to_piece(token)))

    def flush(self) -> str:
        """End of generation: whatever was held back (and incomplete UTF-8) goes out."""
        if self.stopped_by is not None:
            return ""
        text = self.pending + self.dec.decode(b"", final=True)
        self.pending = ""
        return text

    def _feed(self, s: str) -> str:
        if self.stopped_by is not None:
            return ""
        text = self.pending + s
        hits = [(text.find(x), x) for x in self.stop if x in text]
        if hits:
            at, self.stopped_by = min(hits)
            self.pending = ""
            return text[:at]
        hold = 0  # longest tail of `text` that begins some stop sequence
        for x in self.stop:
            for n in range(min(len(x) - 1, len(text)), hold, -1):
                if x.startswith(text[-n:]):
                    hold = n
                    break
        self.pending = text[len(text) - hold :]
        return text[: len(text) - hold]
