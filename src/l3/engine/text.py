"""A request's text as its tokens arrive (`l3 generate`, `l3 serve`): what is safe to send so far, and where a
stop string cuts it.

Text is decoded from all the request's tokens each time (byte-level BPE merges can change the last characters),
and held back while it ends in an incomplete UTF-8 sequence (U+FFFD) or could still be the start of a stop
string, so nothing sent is ever taken back. A stop string ends the text before it (it is not returned)."""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"  # what decoding gives for the bytes of a character not yet complete


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # characters that could begin a stop string
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` already returned
        self.stopped = False  # a stop string was found: the text ends before it

    def push(self, token: int) -> str:
        """Add a token; returns the text newly safe to send (possibly empty)."""
        if self.stopped:
            raise RuntimeError("the text already ended at a stop string")
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        # A match that starts before `sent` would have been complete, and found, when `sent` was reached.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self._send(len(self.text))
        complete = len(self.text.rstrip(REPLACEMENT))
        return self._send(max(complete - self.hold, self.sent))

    def flush(self) -> str:
        """The rest of the text (the request has ended)."""
        return self._send(len(self.text))

    def _send(self, end: int) -> str:
        out, self.sent = self.text[self.sent : end], end
        return out
