"""The serving policy on its own: no model, no torch."""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from serving.errors import EngineBusy
from serving.policy import Policy, Request


def request(prompt: int = 5, max_new_tokens: int = 3, eos=(99,)) -> Request:
    return Request(prompt_ids=list(range(prompt)), max_new_tokens=max_new_tokens, eos=frozenset(eos), streamer=None)


def test_the_policy_imports_without_torch():
    code = "import sys, serving.policy; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_requests_take_the_lowest_free_slots_in_arrival_order_and_the_rest_wait():
    policy = Policy(slots=2, queue_size=5)
    a, b, c = request(), request(), request()
    for r in (a, b, c):
        policy.submit(r)
    admitted, dropped = policy.admit()
    assert admitted == [a, b] and dropped == [] and [a.slot, b.slot] == [0, 1]
    assert policy.waiting == 1
    policy.record(a, 99)  # a stops: slot 0 is free for c
    assert a.finish_reason == "stop" and policy.admit()[0] == [c] and c.slot == 0


def test_a_full_queue_refuses_with_busy():
    policy = Policy(slots=1, queue_size=1)
    policy.submit(request())
    with pytest.raises(EngineBusy, match="busy"):
        policy.submit(request())


def test_a_request_ends_at_its_budget_its_stop_token_or_its_cancel_flag():
    policy = Policy(slots=3, queue_size=3)
    budget, stop, cancel = request(max_new_tokens=2), request(), request()
    for r in (budget, stop, cancel):
        policy.submit(r)
    policy.admit()
    assert not policy.record(budget, 1) and policy.record(budget, 2) and budget.finish_reason == "length"
    assert policy.record(stop, 99) and stop.finish_reason == "stop"
    cancel.cancel.set()
    assert policy.take_cancelled() == [cancel] and cancel.finish_reason == "cancelled"
    assert policy.running() == []


def test_a_request_cancelled_while_waiting_never_takes_a_slot():
    policy = Policy(slots=1, queue_size=2)
    gone = request()
    gone.cancel.set()
    policy.submit(gone)
    admitted, dropped = policy.admit()
    assert admitted == [] and dropped == [gone] and gone.slot == -1


def test_read_tokens_count_the_prompt_and_every_reply_token_but_the_newest():
    r = request(prompt=7)
    r.tokens = [1, 2, 3]
    assert r.read_tokens == 9


def test_closing_hands_back_everything_running_and_waiting():
    policy = Policy(slots=1, queue_size=2)
    running, waiting = request(), request()
    policy.submit(running)
    policy.admit()
    policy.submit(waiting)
    assert policy.close() == [running, waiting]
    woke = threading.Event()
    threading.Thread(target=lambda: (policy.wait_for_work(5), woke.set())).start()
    assert woke.wait(5), "a closed policy must not keep the serving loop waiting"
