"""The gateway's per-token work: an incremental detokenizer that adds up to the whole decode,
stop strings found across token boundaries from the tail alone, and a decode state whose
buffers are sized once and can roll back."""

import random

import pytest
import torch

from gateway.decode import REPLACEMENT, DecodeState, Detokenizer
from gateway.generation import Finished, TextDelta, _advance, _Choice
from shared.models.loader import load_tokenizer
from shared.models.resolve import resolve_model
from tests.tiny import char_tokenizer


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer(resolve_model("smollm2"))


TEXTS = ["The capital of France is Paris. Ünïcödé façade, naïve café — 東京は日本の首都です。🙂👍🏽 done.",
         "def f(x):\n    return x ** 2  # squares\n\n\tindented\r\nmixed   spaces",
         "<|im_start|>user\nhello<|im_end|> after special tokens"]


def pieces(tokenizer, tokens: list[int]) -> tuple[list[str], str]:
    detok = Detokenizer(lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    out = [detok.push(t) for t in tokens]
    return out, detok.flush()


def check_adds_up(tokenizer, tokens: list[int]) -> None:
    whole = tokenizer.decode(tokens, skip_special_tokens=True)
    out, rest = pieces(tokenizer, tokens)
    given = ""
    for i, piece in enumerate(out):
        given += piece
        assert not given.endswith(REPLACEMENT)  # a half character is never sent
        assert whole.startswith(given), (i, given, whole)
    assert given + rest == whole


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_the_whole_decode_of_real_text(smollm2, text):
    tokens = smollm2(text, add_special_tokens=False).input_ids
    check_adds_up(smollm2, tokens)
    out, _ = pieces(smollm2, tokens)
    assert sum(1 for p in out if p) > len(tokens) // 2  # text flows as it is generated, not at the end


def test_pieces_add_up_for_random_tokens_and_split_characters(smollm2):
    rng = random.Random(0)
    vocab = len(smollm2)
    for _ in range(40):  # any ids at all: byte tokens that split characters, specials, junk
        check_adds_up(smollm2, [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))])
    emoji = smollm2("🙂", add_special_tokens=False).input_ids
    assert len(emoji) > 1  # one character over several byte tokens
    out, rest = pieces(smollm2, emoji[:-1])
    assert "".join(out) == "" and rest.endswith(REPLACEMENT)  # held while incomplete; flushed as the whole decode


def test_pieces_add_up_with_the_test_models_tokenizer():
    tokenizer = char_tokenizer()
    rng = random.Random(1)
    for _ in range(20):
        check_adds_up(tokenizer, [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))])


def test_a_tokens_cost_does_not_grow_with_the_answer(smollm2):
    calls = []

    def decode(ids):
        calls.append(len(ids))
        return smollm2.decode(ids, skip_special_tokens=True)

    detok = Detokenizer(decode)
    tokens = smollm2(" ".join(TEXTS) * 20, add_special_tokens=False).input_ids
    for t in tokens:
        detok.push(t)
    assert len(tokens) > 1000 and max(calls) < 16  # each decode sees a few tokens, never the whole answer


class _Model:
    eos_ids = frozenset({0})

    @staticmethod
    def decode(ids):
        return "".join(map(chr, ids))  # a token per character, 0 is EOS


class _Request:
    def __init__(self, stops, max_tokens=100):
        self.stops, self.max_tokens = stops, max_tokens


def run(tokens, stops, max_tokens=100):
    choice = _Choice(0, Detokenizer(_Model.decode))
    events = []
    for t in tokens:
        events += list(_advance(choice, t, _Request(stops, max_tokens), _Model))
        if choice.reason is not None:
            break
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    ends = [e.reason for e in events if isinstance(e, Finished)]
    return text, ends, choice


def ids(text):
    return [ord(c) for c in text]


@pytest.mark.parametrize("text, stops, expected, reason", [
    ("hello world", ["wor"], "hello ", "stop"),  # across tokens
    ("abcabd", ["abd"], "abc", "stop"),  # a held prefix that fails, then matches later
    ("aaab", ["aab"], "a", "stop"),  # overlapping candidates
    ("abcdef", ["xyz"], "abcdef", "length"),
    ("abcdef", ["cd", "b"], "a", "stop"),  # the earliest of several
])
def test_stops_are_found_from_the_tail_across_tokens(text, stops, expected, reason):
    got, ends, _ = run(ids(text), stops, max_tokens=len(text))
    assert got == expected and ends == [reason]


def test_text_is_released_as_soon_as_no_stop_can_start_there():
    choice = _Choice(0, Detokenizer(_Model.decode))
    sent = []
    for t in ids("abxab"):
        sent += [e.text for e in _advance(choice, t, _Request(["abc"]), _Model) if isinstance(e, TextDelta)]
    assert "".join(sent) == "abx" and choice.unsent == "ab"  # "ab" might become "abc"
    assert len(choice.unsent) < 3  # the tail scanned per token is bounded by the stop strings


def test_eos_ends_with_the_held_text():
    text, ends, choice = run(ids("ab") + [0], ["bc"])
    assert text == "ab" and ends == ["stop"] and choice.generated == 2


def test_decode_state_buffers_are_sized_once_and_roll_back():
    eos = torch.tensor([2])
    state = DecodeState([[5, 6, 7], [8]], pad_id=0, max_new=4, vocab_size=10, virtual=2, penalties=True)
    ids_buffer, mask_buffer = state.ids.data_ptr(), state.mask.data_ptr()
    assert state.sequence.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert state.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 1]]  # soft prompt first, then padding
    for step in ([3, 2], [3, 4], [9, 9]):
        state.take(torch.tensor(step), eos)
    assert state.sequence.tolist() == [[5, 6, 7, 3, 3, 9], [0, 0, 8, 2, 4, 9]]
    assert state.attention_mask.shape == (2, 8) and bool(state.attention_mask[:, 5:].all())
    assert state.counts[0, 3] == 2 and state.counts[1, 2] == 0 and state.counts[1, 4] == 1  # EOS never counted
    state.rollback(2, eos)
    assert state.sequence.tolist() == [[5, 6, 7, 3], [0, 0, 8, 2]]
    assert state.counts[0, 3] == 1 and state.counts[1, 4] == 0 and state.counts[0, 9] == 0
    state.take(torch.tensor([1, 1]), eos)
    assert state.sequence.tolist() == [[5, 6, 7, 3, 1], [0, 0, 8, 2, 1]]
    assert (state.ids.data_ptr(), state.mask.data_ptr()) == (ids_buffer, mask_buffer)  # never reallocated
    with pytest.raises(ValueError):
        state.rollback(3, eos)  # only generated tokens roll back
    state.take(torch.tensor([1, 1]), eos)
    state.take(torch.tensor([1, 1]), eos)
    with pytest.raises(RuntimeError):
        state.take(torch.tensor([1, 1]), eos)  # max_new tokens at most
    unpadded = DecodeState([[1, 2], [3, 4]], pad_id=0, max_new=3, vocab_size=5)
    assert unpadded.attention_mask is None and unpadded.counts is None
