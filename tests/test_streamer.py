"""model.streamer.TextIteratorStreamer: incremental, UTF-8-safe streaming with errors and cancel.

The tokenizer is a real byte-level BPE (the `tokenizers` library, as Llama 3 uses) trained here
on multi-byte text with a small vocabulary, so characters are split over several tokens, some
tokens hold the end of one character and the start of the next, and unseen characters fall
back to single-byte tokens."""
import queue
import random
import threading
import time

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model.streamer import TextIteratorStreamer

CORPUS = [
    "Héllo wörld, ça va? Grüße aus Köln. naïve café résumé, señor, Ærø, Łódź, İstanbul.",
    "你好世界，今天天气很好。我们一起去公园散步吧。中文没有空格，所以要逐字输出。",
    "こんにちは、世界！カタカナとひらがな。日本語のテキストです。",
    "안녕하세요 세계. 한국어 문장입니다.",
    "Emoji 😀🎉👍🏽👨‍👩‍👧 🇫🇷 ❤️ 🚀 and math ∑∫√∞ ≤ ≥ → ⇒.",
]
SPECIALS = ["<|begin_of_text|>", "<|eot_id|>"]

TEXTS = {
    "chinese": "中文没有空格，所以要逐字输出。今天天气很好！",
    "japanese": "こんにちは、世界！日本語のテキストです。",
    "korean": "안녕하세요 세계. 한국어 문장입니다.",
    "emoji": "Emoji 😀🎉👍🏽👨‍👩‍👧 🇫🇷 ❤️ 🚀🦙🧠",
    "accented": "Héllo wörld, ça va? Grüße aus Köln. Ærø Łódź İstanbul ñandú",
    "unseen characters": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 𓂀 ᚠᛇᚻ Ωμέγα Ελληνικά",
    "mixed": "A 你好 b 😀\nc ça 세계 ∑ 🇫🇷!\n\n末尾",
}


class ByteLevelTokenizer:
    """The duck type the streamer needs (`decode`), plus `encode` for the tests. Records the
    length of every decode call so tests can check how much each step re-decodes."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self.decoded_lengths: list[int] = []

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        self.decoded_lengths.append(len(ids))
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def special_id(self, token: str) -> int:
        return self._tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330,  # 256 bytes + 2 specials + ~70 merges: most characters span several tokens
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 3, trainer)
    return tokenizer


@pytest.fixture
def tok(bpe) -> ByteLevelTokenizer:
    return ByteLevelTokenizer(bpe)


def drain(streamer: TextIteratorStreamer) -> list[str]:
    """The pieces queued so far, without waiting (the producer runs in this thread)."""
    pieces = []
    while not streamer.text_queue.empty():
        pieces.append(next(streamer))
    return pieces


def stream_one_token_at_a_time(tok: ByteLevelTokenizer, ids: list[int], **kwargs) -> list[str]:
    streamer = TextIteratorStreamer(tok, **kwargs)
    for i in ids:
        streamer.put(torch.tensor([i]))
    streamer.end()
    return list(streamer)


# --- what is streamed ------------------------------------------------------------------------


def test_the_tokenizer_really_splits_characters_across_tokens(tok):
    """Guards the other tests: they only prove something if characters are split."""
    for name, text in TEXTS.items():
        ids = tok.encode(text)
        split = sum(tok.decode(ids[: i + 1]).endswith("\ufffd") for i in range(len(ids)))
        assert split > 0 or name == "accented", f"{name}: no token ends inside a character"
        assert tok.decode(ids) == text, f"{name}: the test tokenizer does not round-trip"


@pytest.mark.parametrize("name", TEXTS)
def test_the_stream_concatenates_to_the_full_decode(tok, name):
    ids = tok.encode(TEXTS[name])
    pieces = stream_one_token_at_a_time(tok, ids)
    assert "".join(pieces) == tok.decode(ids), f"{name}: the streamed text differs from decode(ids)"


@pytest.mark.parametrize("name", TEXTS)
def test_no_piece_holds_a_broken_character(tok, name):
    pieces = stream_one_token_at_a_time(tok, tok.encode(TEXTS[name]))
    broken = [p for p in pieces if "\ufffd" in p]
    assert not broken, f"{name}: pieces with U+FFFD: {broken}"
    assert all(pieces), "an empty piece was emitted"


@pytest.mark.parametrize("name", ["chinese", "japanese", "emoji", "mixed"])
def test_text_is_emitted_as_soon_as_its_characters_are_complete(tok, name):
    """No waiting for a space or newline: after every token whose decode ends on a whole
    character, everything decoded so far has been emitted."""
    ids = tok.encode(TEXTS[name])
    streamer = TextIteratorStreamer(tok)
    emitted = ""
    for i in range(len(ids)):
        streamer.put(torch.tensor([ids[i]]))
        emitted += "".join(drain(streamer))
        so_far = tok.decode(ids[: i + 1])
        if not so_far.endswith("\ufffd"):
            assert emitted == so_far, f"{name}: after token {i} emitted {emitted!r}, readable {so_far!r}"


def test_random_token_sequences_in_random_chunks_stream_exactly(tok):
    """Any ids, invalid UTF-8 included, put in chunks of 1..6 (a prompt, several tokens per step)."""
    rng = random.Random(0)
    for trial in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        streamer = TextIteratorStreamer(tok)
        start = 0
        while start < len(ids):
            size = rng.randrange(1, 7)
            streamer.put(ids[start : start + size])
            start += size
        streamer.end()
        assert "".join(streamer) == tok.decode(ids), f"trial {trial}: ids {ids} streamed wrongly"


def test_end_flushes_an_incomplete_character_as_decode_renders_it(tok):
    ids = tok.encode("ok 😀")
    while not tok.decode(ids).endswith("\ufffd"):
        ids = ids[:-1]  # cut the emoji in the middle of its bytes
    pieces = stream_one_token_at_a_time(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert pieces[-1].endswith("\ufffd"), "the incomplete tail must only come out at end()"


def test_the_same_text_as_transformers_streamer(tok, bpe):
    from transformers import PreTrainedTokenizerFast
    from transformers import TextIteratorStreamer as ReferenceStreamer

    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, clean_up_tokenization_spaces=False)
    prompt = torch.tensor([tok.encode("<|begin_of_text|>Q: 你好?")])
    reply = tok.encode(TEXTS["mixed"]) + [tok.special_id("<|eot_id|>")]
    outputs = []
    for streamer in (TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True),
                     ReferenceStreamer(hf_tokenizer, skip_prompt=True, skip_special_tokens=True)):
        streamer.put(prompt)  # generate() puts (1, L) for the prompt, then (1,) per step
        for i in reply:
            streamer.put(torch.tensor([i]))
        streamer.end()
        outputs.append("".join(streamer))
    assert outputs[0] == outputs[1], f"ours {outputs[0]!r}, transformers {outputs[1]!r}"


# --- options ---------------------------------------------------------------------------------


def test_skip_prompt_drops_the_first_put(tok):
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    streamer.put(torch.tensor([tok.encode("prompt 你好")]))
    for i in tok.encode("回答"):
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert "".join(streamer) == "回答"


def test_without_skip_prompt_the_prompt_is_streamed_too(tok):
    streamer = TextIteratorStreamer(tok)
    streamer.put(torch.tensor([tok.encode("prompt 你好")]))
    streamer.put(torch.tensor(tok.encode(" 回答")))
    streamer.end()
    assert "".join(streamer) == "prompt 你好 回答"


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens_is_passed_to_decode(tok, skip):
    eot = tok.special_id("<|eot_id|>")
    ids = tok.encode("好的 😀") + [eot]
    text = "".join(stream_one_token_at_a_time(tok, ids, skip_special_tokens=skip))
    assert text == ("好的 😀" if skip else "好的 😀<|eot_id|>")


def test_the_streamer_can_be_reused_after_end(tok):
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    texts = []
    for reply in ("一", "二 😀"):
        streamer.put(torch.tensor([tok.encode("prompt")]))
        streamer.put(tok.encode(reply))
        streamer.end()
        texts.append("".join(streamer))
    assert texts == ["一", "二 😀"]


def test_a_batch_of_several_sequences_is_rejected(tok):
    with pytest.raises(ValueError, match="streams one sequence, got a batch of 2; use one streamer per sequence"):
        TextIteratorStreamer(tok).put(torch.tensor([[1, 2], [3, 4]]))


def test_each_step_decodes_only_a_short_recent_window(tok):
    """O(1) work per step: a 3000-token reply never re-decodes more than a few tokens."""
    ids = tok.encode("".join(TEXTS.values()) * 10)
    assert len(ids) > 3000
    pieces = stream_one_token_at_a_time(tok, ids)
    assert "".join(pieces) == tok.decode(ids), "windowed decoding changed the text"
    longest = max(tok.decoded_lengths[:-1])  # the last call is the test's own full decode
    assert longest <= 12, f"a step decoded {longest} tokens: the window is not bounded"
    assert sum(tok.decoded_lengths[:-1]) <= 12 * len(ids)


# --- threads: timeout, errors, cancel --------------------------------------------------------


def test_waiting_longer_than_timeout_raises_queue_empty(tok):
    streamer = TextIteratorStreamer(tok, timeout=0.05)
    with pytest.raises(queue.Empty):
        next(streamer)


def test_an_error_in_the_generating_thread_is_raised_in_the_consumer(tok):
    streamer = TextIteratorStreamer(tok, timeout=10)
    failure = RuntimeError("CUDA out of memory")

    def generate():
        try:
            for i in tok.encode("部分 😀"):
                streamer.put(torch.tensor([i]))
            raise failure
        except RuntimeError as exc:
            streamer.put_error(exc)

    threading.Thread(target=generate).start()
    received = []
    with pytest.raises(RuntimeError) as raised:
        for piece in streamer:
            received.append(piece)
    assert raised.value is failure, "the consumer must get the producer's exception object"
    assert "".join(received) == "部分 😀", "pieces queued before the error were lost"


def test_cancel_sets_the_event_that_the_generate_loop_checks(tok):
    streamer = TextIteratorStreamer(tok, timeout=10)
    text_ids = tok.encode(TEXTS["chinese"])
    put_ids: list[int] = []
    limit = 10_000  # only reached if cancel() is not seen

    def generate():  # the shape of our generate() loop: check, decode a step, put
        while not streamer.cancelled and len(put_ids) < limit:
            put_ids.append(text_ids[len(put_ids) % len(text_ids)])
            streamer.put([put_ids[-1]])
            time.sleep(0.001)
        streamer.end()

    producer = threading.Thread(target=generate)
    producer.start()
    received = ""
    for piece in streamer:
        received += piece
        if len(received) >= 5:
            streamer.cancel()
    producer.join(timeout=10)
    assert streamer.cancel_event.is_set()
    assert len(put_ids) < limit, "the generate loop did not stop after cancel()"
    assert received == tok.decode(put_ids), "text generated before the stop was lost"


def test_a_shared_cancel_event_is_used(tok):
    event = threading.Event()
    streamer = TextIteratorStreamer(tok, cancel_event=event, skip_special_tokens=True)
    streamer.cancel()
    assert event.is_set() and streamer.cancelled
    assert streamer.decode_kwargs == {"skip_special_tokens": True}, "cancel_event leaked into decode kwargs"
