"""A stand-in for ZeroGPU's contract, played in this process, and a guard that fails loudly when a
model forward runs without a GPU.

`StandInZeroGPU.GPU` is used as `spaces.GPU(task, duration=...)`. A call of the decorated
generator asks for `duration(*args)` seconds (refused with ZeroGPU's own error when the quota
left is smaller), then runs the task inside a GPU scope: the scope opens when the call starts and
closes when it ends, and the task's arguments and what it yields are pickled across, as between
the Space's process and ZeroGPU's worker. With `abort_after`, a call is aborted after that many
items, with ZeroGPU's error, as when a call runs past its duration. `guard(model)` puts a forward pre-hook on the model
that raises (and records the offence) when a forward runs while no scope is open: on ZeroGPU that
forward would have no GPU.
"""
from __future__ import annotations

import pickle
import threading
from dataclasses import dataclass, field


class NoGpu(RuntimeError):
    """A model forward ran outside every GPU call."""


@dataclass
class Call:
    duration: int
    forwards: int = 0
    items: int = 0
    ended: bool = False


@dataclass
class StandInZeroGPU:
    quota_s: float = float("inf")
    abort_after: int | None = None  # items a call yields before ZeroGPU takes the GPU back
    calls: list[Call] = field(default_factory=list)
    offences: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[Call] = []

    def GPU(self, task, *, duration):
        def call(*args, **kwargs):
            seconds = duration(*args, **kwargs)
            if seconds > self.quota_s:
                # the error ZeroGPU raises, with its wording
                from spaces.zero.gradio import error

                raise error("ZeroGPU quota exceeded", f"You have exceeded your free ZeroGPU quota "
                                                      f"({seconds}s requested vs. {self.quota_s:.0f}s left). "
                                                      "Try again in 0:10:00.")
            args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))  # into the worker process
            record = Call(duration=seconds)
            with self._lock:
                self.calls.append(record)
                self._open.append(record)
            running = task(*args, **kwargs)
            try:
                for item in running:
                    if record.items == self.abort_after:  # the call ran past its duration
                        from spaces.zero.gradio import error

                        raise error("ZeroGPU worker error", "GPU task aborted")
                    record.items += 1
                    yield pickle.loads(pickle.dumps(item))  # out of the worker process
            finally:
                running.close()  # what ZeroGPU's worker does when the Space closes the call
                with self._lock:
                    self._open.remove(record)
                    record.ended = True
        return call

    @property
    def open_calls(self) -> int:
        with self._lock:
            return len(self._open)

    def guard(self, model) -> None:
        """Fail every forward of the model, of its vision tower and of its text model that runs
        outside a GPU call; count the model's forwards in each call."""
        def check(module, args, kwargs):
            with self._lock:
                if self._open:
                    if module is model:
                        for record in self._open:
                            record.forwards += 1
                    return
                self.offences.append(f"{type(module).__name__} forward outside a GPU call")
            raise NoGpu("a model forward ran outside every @spaces.GPU call: on ZeroGPU it has no GPU")

        for module in (model, model.vision_model, text_model(model)):
            module.register_forward_pre_hook(check, with_kwargs=True)


def text_model(model):
    """The decoder stack every prefill and decode step runs through."""
    return model.language_model.model
