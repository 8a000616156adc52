"""TextIteratorStreamer: text pieces from a generating thread to a consumer, as they become
readable.

Same interface as transformers' `TextIteratorStreamer` (`put`, `end`, iterate, `timeout`,
`skip_prompt`, decode kwargs such as `skip_special_tokens`), with three deliberate differences:

* Incremental detokenization (vLLM's scheme): each `put` decodes only a short window of recent
  tokens, so a step costs O(1) instead of re-decoding the whole reply, and text is emitted as
  soon as it does not end in U+FFFD, the mark of a UTF-8 character whose bytes have not all
  arrived. Pieces never hold half a character, and CJK or emoji stream without waiting for a
  space (transformers holds back everything up to the next space or newline).
* `put_error(exc)`: the generating thread hands over its exception; the consumer's iteration
  raises it instead of waiting forever.
* Cancellation: the consumer calls `cancel()`; the generate loop checks `cancel_event` once per
  step and ends the generation (it still calls `end()`, so the consumer's loop finishes).

The concatenated pieces equal `tokenizer.decode(all_ids, **decode_kwargs)` when decoding is a
concatenation of the tokens' bytes (byte-level BPE, as in Llama 3). Decode-time rewrites that
look across token boundaries (`clean_up_tokenization_spaces`) cannot be undone once a piece
is out; leave them off for streaming.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from typing import Any, Protocol

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class _End:
    """Queue item: the generation finished."""


class _Failure:
    """Queue item: the generation failed; the consumer raises `exc`."""

    def __init__(self, exc: BaseException):
        self.exc = exc


class TextIteratorStreamer:
    """Iterate over the text of one generated sequence while another thread generates it.

    tokenizer: anything with `decode(ids: list[int], **decode_kwargs) -> str`.
    skip_prompt: drop the first `put` (generate() puts the prompt first).
    timeout: seconds the consumer waits for the next piece before `queue.Empty` is raised.
    cancel_event: an event to share with the generate loop; a fresh one by default.
    decode_kwargs: passed to every `tokenizer.decode` call, e.g. `skip_special_tokens=True`.
    """

    def __init__(
        self,
        tokenizer: Decoder,
        skip_prompt: bool = False,
        timeout: float | None = None,
        *,
        cancel_event: threading.Event | None = None,
        **decode_kwargs: Any,
    ):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.timeout = timeout
        self.decode_kwargs = decode_kwargs
        self.cancel_event = cancel_event if cancel_event is not None else threading.Event()
        self.text_queue: queue.Queue[str | _End | _Failure] = queue.Queue()
        self._start()

    def _start(self) -> None:
        # _ids holds a context window of already emitted tokens, then the pending ones:
        # ids[:read] were emitted; decode(ids[:read]) == self._window_text.
        self._ids: list[int] = []
        self._read = 0
        self._window_text = ""
        self._next_is_prompt = True

    # --- producer side (the generating thread) --------------------------------------------------

    def put(self, value: Any) -> None:
        """Add token ids: a tensor/array of shape (n,) or (1, n), or a sequence of ints."""
        if hasattr(value, "shape"):
            if len(value.shape) > 1 and value.shape[0] > 1:
                raise ValueError(
                    f"TextIteratorStreamer streams one sequence, got a batch of {value.shape[0]}; "
                    "use one streamer per sequence"
                )
            ids = value.reshape(-1).tolist()
        else:
            ids = [int(t) for t in value]
        if self.skip_prompt and self._next_is_prompt:
            self._next_is_prompt = False
            return
        self._next_is_prompt = False
        self._ids.extend(ids)
        text = self._decode(self._ids)
        if len(text) > len(self._window_text) and not text.endswith(REPLACEMENT_CHAR):
            self.text_queue.put(text[len(self._window_text):])
            # The tokens just emitted become the next window's context; older ones are dropped.
            del self._ids[: self._read]
            self._read = len(self._ids)
            self._window_text = self._decode(self._ids)

    def end(self) -> None:
        """Flush what is left (an incomplete character is emitted as decode() renders it, with
        U+FFFD) and finish the stream. The streamer can then be used for another generation."""
        if len(self._ids) > self._read:
            rest = self._decode(self._ids)[len(self._window_text):]
            if rest:
                self.text_queue.put(rest)
        self.text_queue.put(_End())
        self._start()

    def put_error(self, exc: BaseException) -> None:
        """Finish the stream with an error: the consumer's iteration raises `exc` after the
        pieces already queued. Call it instead of `end()` when generation fails."""
        self.text_queue.put(_Failure(exc))
        self._start()

    @property
    def cancelled(self) -> bool:
        """True once the consumer asked to stop; the generate loop checks it every step."""
        return self.cancel_event.is_set()

    # --- consumer side --------------------------------------------------------------------------

    def cancel(self) -> None:
        """Ask the generating thread to stop after its current step. Keep iterating to receive
        the text generated until then; the stream ends when the generate loop calls `end()`."""
        self.cancel_event.set()

    def __iter__(self) -> TextIteratorStreamer:
        return self

    def __next__(self) -> str:
        item = self.text_queue.get(timeout=self.timeout)  # queue.Empty after `timeout` seconds
        if isinstance(item, _End):
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.exc
        return item

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), **self.decode_kwargs)
