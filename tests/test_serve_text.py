"""Token ids -> text deltas: stop sequences across tokens, held-back prefixes, split UTF-8."""

from llmkit.core.serve.text import TextOut


class Pieces:
    """A tokenizer whose token i is the byte string PIECES[i]."""

    def __init__(self, pieces):
        self.pieces = pieces

    def token_to_piece(self, t):
        return self.pieces[t]


def _run(pieces, stop, ids):
    out = TextOut(Pieces(pieces), stop)
    deltas = [out.push(i) for i in ids]
    if out.stopped_by is None:
        deltas.append(out.flush())
    return deltas, out.stopped_by


def test_stop_sequence_spanning_tokens_is_cut_and_never_emitted():
    deltas, stop = _run([b"Hello ", b"wor", b"ld", b"!"], ["world"], [0, 1, 2, 3])
    assert "".join(deltas) == "Hello " and stop == "world"
    assert deltas[1] == ""  # "wor" was held back: it could start the stop sequence


def test_held_back_text_is_released_when_the_stop_does_not_follow():
    deltas, stop = _run([b"a wo", b"rm", b" eats"], ["world"], [0, 1, 2])
    assert deltas == ["a ", "worm", " eats", ""] and stop is None


def test_earliest_of_several_stops_wins_and_flush_gives_the_rest():
    assert _run([b"xx END yy STOP"], ["STOP", "END"], [0]) == (["xx "], "END")
    assert _run([b"abc", b"de"], ["zz"], [0, 1]) == (["abc", "de", ""], None)


def test_multibyte_characters_split_across_tokens():
    euro = "€".encode()  # 3 bytes
    deltas, _ = _run([euro[:1], euro[1:], b"!"], [], [0, 1, 2])
    assert deltas == ["", "€", "!", ""]
