"""Records both sides agree on: spans of layers (and, with the registry, server records)."""

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Span:
    """Half-open range of layers [start, end), global 0-based indices."""

    start: int
    end: int

    def __post_init__(self):
        if not 0 <= self.start < self.end:
            raise ValueError(f"a span needs 0 <= start < end, got [{self.start}, {self.end})")

    def __len__(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"

    @classmethod
    def parse(cls, text: str) -> "Span":
        """'START:END' as written on the command line."""
        try:
            start, end = (int(p) for p in text.split(":"))
        except ValueError:
            raise ValueError(f"a span is written START:END (e.g. 0:10), got {text!r}") from None
        return cls(start, end)


def even_spans(num_layers: int, parts: int) -> list[Span]:
    """Split [0, num_layers) into `parts` contiguous spans whose lengths differ by at most one."""
    if not 1 <= parts <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {parts} spans")
    bounds = [round(i * num_layers / parts) for i in range(parts + 1)]
    return [Span(a, b) for a, b in zip(bounds, bounds[1:])]
