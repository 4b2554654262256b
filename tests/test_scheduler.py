"""The scheduler's exact decisions (pure Python, no device): decodes first, then chunks with
exact slots and boundaries, offsets, back-pressure, tokens in flight."""


from jax_vattention.engine import Request
from jax_vattention.engine.requests import RequestState
from jax_vattention.engine.scheduler import Scheduler


def state(request_id, prompt_len, *, computed=0, generated=()):
    return RequestState(request_id, Request(prompt=list(range(1, prompt_len + 1))), 0.0,
                        generated=list(generated), computed=computed)


def test_the_scheduler_fills_the_budget_with_decodes_first_then_chunks_with_exact_slots_and_boundaries():
    scheduler = Scheduler(max_batch=4, token_budget=12, chunk_tokens=4, chunk_rows=4)
    free = [2, 0, 3, 1]
    for request_id, length in enumerate((10, 3, 5)):
        scheduler.add(state(request_id, length))
    plan = scheduler.schedule(lambda s: free.pop(0))
    # Request 0 takes three rows in slot 2 (its whole prompt); request 1 the 2 tokens left of the budget.
    assert [(c.slot, c.start, c.count, c.last) for c in plan.chunks] == [
        (2, 0, 4, False), (2, 4, 4, False), (2, 8, 2, True), (0, 0, 2, False)]
    assert [s.request_id for s in plan.admitted] == [0, 1] and not plan.decodes
    assert plan.growth(4) == [2, 0, 10, 0]
    scheduler.completed(plan)
    scheduler.running[2].generated.append(7)                     # request 0 sampled its first token
    plan = scheduler.schedule(lambda s: free.pop(0))
    # Request 0 decodes (slot 2, position 10); request 1 ends its prompt; request 2 goes to slot 3.
    assert [(s.request_id, s.slot, s.computed) for s in plan.decodes] == [(0, 2, 10)]
    assert [(c.slot, c.start, c.count, c.last) for c in plan.chunks] == [
        (0, 2, 1, True), (3, 0, 4, False), (3, 4, 1, True)]
    assert plan.tokens == 7 and [s.request_id for s in plan.admitted] == [2]
    assert plan.growth(4) == [1, 0, 1, 5]
    assert scheduler.youngest().request_id == 2
    scheduler.preempt(scheduler.youngest())
    assert [s.request_id for s in scheduler.waiting] == [2] and sorted(scheduler.running) == [0, 2]


def test_a_prefill_may_start_at_an_offset_and_admission_stops_at_back_pressure():
    scheduler = Scheduler(max_batch=2, token_budget=8, chunk_tokens=8, chunk_rows=2)
    scheduler.add(state(0, 20, computed=16))                    # 16 tokens already cached (a shared prefix)
    scheduler.add(state(1, 4))
    plan = scheduler.schedule(lambda s: 1 if s.request_id == 0 else None)
    assert [(c.slot, c.start, c.count, c.last) for c in plan.chunks] == [(1, 16, 4, True)]
    assert [s.request_id for s in scheduler.waiting] == [1]


def test_a_token_in_flight_holds_back_the_decode_that_would_pass_the_limit_and_a_requeued_admission():
    scheduler = Scheduler(max_batch=2, token_budget=8, chunk_tokens=4, chunk_rows=2)
    running = state(0, 3, computed=3)
    running.request.max_new_tokens = 2
    running.prefilled, running.slot, running.generated = True, 0, [5]
    running.in_flight = 1                                        # its second (last) token is on the device
    scheduler.running[0] = running
    requeued = state(1, 4)
    requeued.in_flight = 1                                       # preempted while its token was in flight
    scheduler.add(requeued)
    plan = scheduler.schedule(lambda s: 1)
    assert plan.empty and [s.request_id for s in scheduler.waiting] == [1]
    requeued.in_flight = 0
    plan = scheduler.schedule(lambda s: 1)
    assert [s.request_id for s in plan.admitted] == [1] and not plan.decodes
