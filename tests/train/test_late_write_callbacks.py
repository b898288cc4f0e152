"""Tensorstore's late done-callbacks into a closed asyncio loop print nothing once a Checkpointer exists.

After a failed save (a full disk), tensorstore writes still in flight finish after orbax closed the event loop
that awaited them; tensorstore reports the loop's `RuntimeError('Event loop is closed')` to `sys.unraisablehook`,
whose default prints a bare traceback before the run's one-line error. The same mechanism is reproduced here
directly: a tensorstore future awaited on a loop that is then closed, and the future completed afterwards."""

import asyncio
import sys

import tensorstore as ts

from train.checkpointing import Checkpointer


def _complete_after_the_loop_closed() -> None:
    promise, future = ts.Promise.new()
    loop = asyncio.new_event_loop()

    async def awaiting():
        return await future

    loop.create_task(awaiting())
    loop.run_until_complete(asyncio.sleep(0.01))  # the task now awaits the future: its callback targets `loop`
    loop.close()
    promise.set_result(5)  # tensorstore calls loop.call_soon_threadsafe on the closed loop


def test_a_late_callback_into_a_closed_loop_prints_nothing(tmp_path, monkeypatch, capfd):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    _complete_after_the_loop_closed()
    # Without the filter the error reaches the hook (the default hook prints its bare traceback).
    assert [(type(u.exc_value), str(u.exc_value)) for u in reported] == [(RuntimeError, "Event loop is closed")]

    Checkpointer(tmp_path, keep=1, save_every=1).close()  # installs the filter in front of `reported.append`
    reported.clear()
    _complete_after_the_loop_closed()
    assert reported == []
    assert capfd.readouterr().err == ""


def test_other_unraisable_errors_still_reach_the_previous_hook(tmp_path, monkeypatch):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    Checkpointer(tmp_path, keep=1, save_every=1).close()

    class Broken:
        def __del__(self):
            raise RuntimeError("Event loop is closed")  # same words, but not a loop callback

    Broken()
    assert [str(u.exc_value) for u in reported] == ["Event loop is closed"]
