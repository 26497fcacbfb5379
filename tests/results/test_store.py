"""``ResultsStore.claim``: how workers sharing a results directory split candidates.

The contract (its docstring): the claim is a ``.claim`` file created exclusively in the
candidate folder, holding the owner's host and pid. A candidate already finished (metrics, or
a failure recorded after the claim started) is not claimed: the claim yields False. While a
live worker holds the claim, others wait (a second claim from the same process waits too: the
owner is alive); a claim whose owner died on this host is taken over, one from another host
never is, and an empty one (a crash between create and write) only once it is stale. On exit
the claim file is removed, so the candidate can be claimed again.

Threads stand in for workers where the pid does not matter; the races are real processes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from amp_search.results.store import ResultsStore

DIGEST = "0123456789abcdef"
POLL = 0.02
#: Long enough for a waiting claim to have polled many times.
SETTLE = 0.3


def _claim_file(store):
    return store.candidate_dir(DIGEST) / ".claim"


def _finish(store, name="metrics.json", obj=None):
    store.write_json(store.candidate_dir(DIGEST) / name, obj or {"deviation": 0.5})


class _Claimer(threading.Thread):
    """Claims DIGEST in a thread; records what the claim yielded and when it returned."""

    def __init__(self, store, hold=None, on_claim=None):
        super().__init__(daemon=True)
        self.store, self.hold, self.on_claim = store, hold, on_claim
        self.acquired = threading.Event()
        self.mine = None
        self.returned_at = None

    def run(self):
        with self.store.claim(DIGEST, poll_s=POLL) as mine:
            self.mine = mine
            self.returned_at = time.time()
            self.acquired.set()
            if mine and self.hold is not None:
                self.hold.wait(30)
            if mine and self.on_claim is not None:
                self.on_claim()

    def result(self):
        self.join(30)
        assert not self.is_alive(), "the claim never returned"
        return self.mine


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_free_candidate_is_claimed_and_released(tmp_path):
    store = ResultsStore(tmp_path)
    with store.claim(DIGEST) as mine:
        assert mine is True
        owner = json.loads(_claim_file(store).read_text())
        assert owner == {"host": socket.gethostname(), "pid": os.getpid()}
    assert not _claim_file(store).exists()
    with store.claim(DIGEST) as again:  # released: claimable again
        assert again is True
    assert not _claim_file(store).exists()


def test_a_finished_candidate_is_not_claimed(tmp_path):
    store = ResultsStore(tmp_path)
    _finish(store)
    with store.claim(DIGEST) as mine:
        assert mine is False
        assert not _claim_file(store).exists()


def test_a_failure_recorded_before_the_claim_is_tried_again(tmp_path):
    store = ResultsStore(tmp_path)
    _finish(store, "error.json", {"error": "old"})
    past = time.time() - 60
    os.utime(store.candidate_dir(DIGEST) / "error.json", (past, past))
    with store.claim(DIGEST) as mine:
        assert mine is True


def test_a_live_claim_makes_a_second_one_wait_for_its_result(tmp_path):
    store = ResultsStore(tmp_path)
    release = threading.Event()
    finished_at = []

    def finish():
        _finish(store)
        finished_at.append(time.time())

    first = _Claimer(store, hold=release, on_claim=finish)
    first.start()
    assert first.acquired.wait(10) and first.mine is True
    second = _Claimer(store)  # same process, so the same (live) owner
    second.start()
    time.sleep(SETTLE)
    assert second.is_alive() and second.mine is None  # waiting, not taken over
    release.set()
    assert second.result() is False  # the first one's result stands
    assert first.result() is True
    assert second.returned_at >= finished_at[0]
    assert not _claim_file(store).exists()


def test_a_claim_released_without_a_result_passes_to_the_waiter(tmp_path):
    store = ResultsStore(tmp_path)
    release = threading.Event()
    first = _Claimer(store, hold=release)
    first.start()
    assert first.acquired.wait(10)
    second = _Claimer(store, hold=threading.Event())
    second.start()
    time.sleep(SETTLE)
    assert second.mine is None
    release.set()
    assert first.result() is True
    assert second.acquired.wait(10) and second.mine is True  # evaluates it itself
    second.hold.set()
    second.result()


def test_a_failure_while_waiting_counts_as_finished(tmp_path):
    store = ResultsStore(tmp_path)
    release = threading.Event()

    def fail():
        _finish(store, "error.json", {"error": "broke"})

    first = _Claimer(store, hold=release, on_claim=fail)
    first.start()
    assert first.acquired.wait(10)
    since = time.time()
    second = _Claimer(store)
    second.start()
    time.sleep(SETTLE)
    release.set()
    assert second.result() is False
    assert store.cached_error(DIGEST, since=since) == "broke"


def test_a_dead_owners_claim_is_taken_over(tmp_path):
    store = ResultsStore(tmp_path)
    pid = _dead_pid()
    _claim_file(store).parent.mkdir(parents=True)
    _claim_file(store).write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
    claimer = _Claimer(store, hold=threading.Event())
    claimer.start()
    assert claimer.acquired.wait(10), "the dead owner's claim was not taken over"
    assert claimer.mine is True
    assert json.loads(_claim_file(store).read_text())["pid"] == os.getpid()
    claimer.hold.set()
    claimer.result()
    assert not _claim_file(store).exists()


def test_a_claim_from_another_host_is_never_taken_over(tmp_path):
    store = ResultsStore(tmp_path)
    # Its pid means nothing here (even a dead one): only its own host can tell.
    other = {"host": f"not-{socket.gethostname()}", "pid": _dead_pid()}
    _claim_file(store).parent.mkdir(parents=True)
    _claim_file(store).write_text(json.dumps(other))
    claimer = _Claimer(store)
    claimer.start()
    time.sleep(SETTLE)
    assert claimer.is_alive() and claimer.mine is None
    _finish(store)  # the other host's worker finishes
    assert claimer.result() is False
    assert json.loads(_claim_file(store).read_text()) == other  # left to its owner


def test_an_empty_claim_is_taken_over_only_when_stale(tmp_path):
    store = ResultsStore(tmp_path)
    _claim_file(store).parent.mkdir(parents=True)
    _claim_file(store).write_text("")  # created, not yet written (or its writer crashed)
    claimer = _Claimer(store, hold=threading.Event())
    claimer.start()
    time.sleep(SETTLE)
    assert claimer.mine is None  # it may be being written right now
    past = time.time() - 60
    os.utime(_claim_file(store), (past, past))
    assert claimer.acquired.wait(10) and claimer.mine is True
    claimer.hold.set()
    claimer.result()


def _race(root, start, results, hold_s, finish):
    store = ResultsStore(root)
    start.wait(30)
    with store.claim(DIGEST, poll_s=POLL) as mine:
        t_in = time.time()
        if mine:
            time.sleep(hold_s)
        t_out = time.time()  # before the result appears and before the claim is released
        if mine and finish:
            store.write_json(store.candidate_dir(DIGEST) / "metrics.json", {"by": os.getpid()})
    results.put((os.getpid(), mine, t_in, t_out))


def _run_race(root, n, hold_s, finish):
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(root), start, results, hold_s, finish))
             for _ in range(n)]  # fmt: skip
    for p in procs:
        p.start()
    start.set()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return got


def test_processes_racing_for_one_digest_build_it_once(tmp_path):
    got = _run_race(tmp_path, 3, hold_s=0.3, finish=True)
    winners = [g for g in got if g[1]]
    assert len(winners) == 1
    pid, _, _, done = winners[0]
    assert ResultsStore(tmp_path).cached_metrics(DIGEST) == {"by": pid}
    # The others waited for the winner's result rather than building it too.
    assert all(t_in >= done for _, mine, t_in, _ in got if not mine)


def test_processes_never_hold_one_claim_together(tmp_path):
    # No result is written: each process gets the claim in turn, never two at once.
    got = _run_race(tmp_path, 3, hold_s=0.15, finish=False)
    assert all(mine for _, mine, _, _ in got)
    spans = sorted((t_in, t_out) for _, _, t_in, t_out in got)
    for (_, end), (begin, _) in zip(spans, spans[1:], strict=False):
        assert begin >= end
    assert not (tmp_path / "candidates" / DIGEST / ".claim").exists()


@pytest.mark.parametrize("bad", ["not json", '{"host": "HOST"}', '{"host": "HOST", "pid": "x"}'])
def test_an_unreadable_owner_on_this_host_is_not_taken_over(tmp_path, bad):
    # Only a claim known to be dead (or an old empty file) is taken: a fresh unreadable one
    # may be being written, and one with no usable pid cannot be checked.
    store = ResultsStore(tmp_path)
    _claim_file(store).parent.mkdir(parents=True)
    _claim_file(store).write_text(bad.replace("HOST", socket.gethostname()))
    claimer = _Claimer(store)
    claimer.start()
    time.sleep(SETTLE)
    assert claimer.is_alive() and claimer.mine is None
    _finish(store)
    assert claimer.result() is False
