"""Stop strings over streamed text: what may be sent now, and where the text ends.

Text that could still turn into a stop string (a suffix that is a prefix of one) is held back,
so a stop string never reaches the client, even when it spans several tokens."""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what a tokenizer decodes an unfinished UTF-8 sequence to


def releasable(text: str, stops: list[str]) -> tuple[int, bool]:
    """Return (n, stopped): the first n characters of `text` may be sent; `stopped` when a stop
    string occurs, n being where the earliest one starts."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return min(hits), True
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    n = len(text) - held
    while n > 0 and text[n - 1] == REPLACEMENT:  # may complete into a character with the next token
        n -= 1
    return n, False
