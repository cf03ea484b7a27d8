"""The server's scheduling policy (runtime/fairness.py) on its own: who goes next, and how big a batch may be."""

from collections import deque

from rtdiff.runtime.fairness import HALF_LIFE_S, FairBatcher


def queued(**clients):
    """client name -> a deque of that many queued requests (stand-ins: only their number counts)."""
    return {name.encode(): deque(range(count)) for name, count in clients.items()}


def serve(fair: FairBatcher, client: str, times: int, now: float) -> None:
    for _ in range(times):
        fair.charge(client.encode(), now)


def test_a_client_waiting_for_each_reply_goes_before_flooders_even_when_served_more():
    fair = FairBatcher(max_batch=16)
    for flooder in ("a", "b", "c", "d"):
        serve(fair, flooder, 5, now=0.0)
    serve(fair, "light", 20, now=0.0)  # more service than any flooder: its share does not matter, its queue does
    assert fair.next_client(queued(a=32, b=32, c=30, d=31, light=1), now=0.1) == b"light"


def test_between_clients_with_as_many_queued_the_least_served_goes_first():
    fair = FairBatcher(max_batch=16)
    serve(fair, "busy", 50, now=0.0)
    serve(fair, "quiet", 1, now=0.0)
    assert fair.next_client(queued(busy=3, quiet=3), now=0.0) == b"quiet"
    assert fair.next_client(queued(busy=2, quiet=3), now=0.0) == b"busy"


def test_equal_clients_alternate_and_service_decays():
    fair = FairBatcher(max_batch=16)
    order = []
    for _ in range(6):
        client = fair.next_client(queued(x=1, y=1), now=0.0)
        fair.charge(client, now=0.0)
        order.append(client)
    assert order.count(b"x") == order.count(b"y") == 3
    serve(fair, "x", 10, now=0.0)
    assert abs(fair.service(b"x", now=HALF_LIFE_S) - fair.service(b"x", now=0.0) / 2) < 1e-9


def test_the_batch_cap_follows_measured_time_per_size_against_the_tightest_deadline():
    fair = FairBatcher(max_batch=16)
    fair.finished(16, 138.0, now=0.0)
    assert fair.cap == 16  # no deadlines seen: batches as large as allowed
    fair.saw_deadline(200.0, now=1.0)
    fair.finished(16, 138.0, now=1.0)
    assert fair.cap == 1  # 138 ms is more than half of 200; nothing smaller measured yet: start from one
    fair.finished(1, 36.0, now=1.1)
    assert fair.cap == 2  # one fits; two is not measured: try it
    fair.finished(2, 76.0, now=1.2)
    assert fair.cap == 3
    fair.finished(3, 120.0, now=1.3)
    assert fair.cap == 2  # three took more than 100 ms
    fair.finished(2, 76.0, now=20.0)  # the deadline is no longer recent
    assert fair.cap == 16


def test_a_size_shut_out_by_one_slow_batch_is_tried_again_later():
    fair = FairBatcher(max_batch=16)
    fair.saw_deadline(200.0, now=0.0)
    fair.finished(1, 36.0, now=0.0)
    fair.finished(2, 300.0, now=0.1)  # one batch of two slowed down by something else on the machine
    assert fair.cap == 1
    fair.finished(1, 36.0, now=5.0)  # two has not been computed for seconds: try it again
    assert fair.cap == 2
