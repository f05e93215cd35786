"""Engine behaviour: abort, preemption, stop strings, streaming, bad input."""

from __future__ import annotations

import asyncio
import math
import shutil
import threading
import time

import pytest

from dflash_ray import LLM, SamplingParams
from dflash_ray.config import EngineConfig
from dflash_ray.executors import make_engine

from .conftest import VOCAB, save_drafter

CHARS = "abcdefghijklmnopqrstuvwxyz .,:\n"  # 31 tokens + the mask id = VOCAB


def add_char_tokenizer(model_dir):
    """A character-level tokenizer.json over the tiny vocab, so text prompts and stop strings
    work on the tiny random target."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab["<|MASK|>"] = VOCAB - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|MASK|>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<|MASK|>"])
    tok.save(str(model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def text_llm(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("text") / "moe"
    shutil.copytree(tiny["moe"], d)
    add_char_tokenizer(d)
    return LLM(str(d), tiny["drafter"])


def test_text_prompt_round_trip_and_stop_string(text_llm):
    free = text_llm.generate("hello world", SamplingParams(max_tokens=30), use_tqdm=False)[0]
    assert text_llm.tokenizer.decode(free.token_ids) == free.text
    assert len(free.text) == 30  # one character per token, none special
    stop = free.text[10:12]
    cut = text_llm.generate(
        "hello world", SamplingParams(max_tokens=30, stop=[stop]), use_tqdm=False
    )[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index(stop)]
    assert stop not in cut.text
    # tokens stop at the one that completed the stop string
    assert cut.token_ids == free.token_ids[: free.text.index(stop) + len(stop)]


def test_abort_frees_every_kv_block(llms):
    engine = llms["dflash"].engine
    total = engine.blocks.num_free
    ids = [
        engine.add_request([1, 2, 3] * (i + 1), SamplingParams(max_tokens=200)) for i in range(6)
    ]
    for _ in range(4):
        engine.step()
    assert engine.blocks.num_free < total
    for rid in ids:
        assert engine.abort(rid)
    assert not engine.abort(ids[0])  # already gone
    assert engine.blocks.num_free == total and not engine.has_unfinished()


@pytest.mark.parametrize("drafter", [False, True])
def test_preemption_preserves_output(tiny, drafter):
    prompts = [[(3 * i + j) % 30 for j in range(5 + i)] for i in range(6)]
    params = SamplingParams(max_tokens=60)
    kw = dict(target=tiny["moe"], drafter=tiny["drafter"] if drafter else None)
    if drafter:
        kw["spec_profile"] = "whole_block"  # every step speculates, whatever the batch
    roomy = LLM(**kw).generate(prompts, params, use_tqdm=False)
    # 4 positions per block, 40 blocks: six sequences of up to 75 tokens cannot all fit
    tight_llm = LLM(**kw, kv_block_len=4, num_kv_blocks=40)
    tight = tight_llm.generate(prompts, params, use_tqdm=False)
    assert tight_llm.engine.stats().counters.num_preemptions > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]
    assert tight_llm.engine.blocks.num_free == 40


def test_sampled_preemption_is_reproducible(tiny):
    prompts = [[1, 2, 3, 4, 5 + i] for i in range(6)]
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=i) for i in range(6)]
    kw = dict(target=tiny["moe"], drafter=tiny["drafter"])
    roomy = LLM(**kw).generate(prompts, params, use_tqdm=False)
    tight_llm = LLM(**kw, kv_block_len=4, num_kv_blocks=40)
    tight = tight_llm.generate(prompts, params, use_tqdm=False)
    assert tight_llm.engine.stats().counters.num_preemptions > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]


def test_async_stream_yields_deltas_and_disconnect_aborts(llms):
    engine = llms["dflash"].engine

    async def collect():
        chunks = []
        async for out in engine.stream([5, 6, 7], SamplingParams(max_tokens=25)):
            chunks.append(out.new_token_ids)
        return chunks

    async def leave_early():
        agen = engine.stream([5, 6, 7, 8], SamplingParams(max_tokens=400))
        async for _ in agen:
            break
        await agen.aclose()

    async def main():
        chunks = await collect()
        await leave_early()
        return chunks

    total = engine.blocks.num_free
    chunks = asyncio.run(main())
    flat = [t for c in chunks for t in c]
    want = llms["dflash"].generate([[5, 6, 7]], SamplingParams(max_tokens=25), use_tqdm=False)
    assert flat == want[0].token_ids and len(chunks) > 1
    assert engine.blocks.num_free == total and not engine.has_unfinished()


def test_slow_stream_consumer_gets_merged_deltas(llms):
    """Steps that finish while the consumer is busy arrive as one delta, nothing lost."""
    engine = llms["plain"].engine

    async def collect():
        chunks = []
        async for out in engine.stream([5, 6, 7], SamplingParams(max_tokens=40, ignore_eos=True)):
            chunks.append(out)
            await asyncio.sleep(0.05)  # a consumer much slower than a step of the tiny model
        return chunks

    chunks = asyncio.run(collect())
    final = chunks[-1]
    assert final.finished and len(final.token_ids) == 40
    assert [t for c in chunks for t in c.new_token_ids] == final.token_ids
    assert "".join(c.new_text for c in chunks) == final.text
    assert len(chunks) < 40  # one output per step (40 of them) unless merged


def test_stepping_after_streams_gets_every_output(llms):
    """Right after streams finish, a caller that steps the engine itself gets all its outputs:
    the streaming loop must not go on stepping (and swallow) requests no stream waits for."""
    import threading

    engine = llms["dflash"].engine
    params = SamplingParams(max_tokens=12, ignore_eos=True)

    async def streams():
        async def one(p):
            return [o async for o in engine.stream(p, params)][-1].token_ids
        return await asyncio.gather(*(one([3 + i, 4, 5]) for i in range(3)))

    def rounds(done: list):
        for _ in range(6):
            asyncio.run(streams())
            rids = [engine.add_request([7 + i, 8], params) for i in range(3)]
            finished = set()
            while len(finished) < len(rids):  # a raw step loop, as dflash_ray.bench does
                finished |= {o.request_id for o in engine.step() if o.finished}
        done.append(True)

    done: list = []
    t = threading.Thread(target=rounds, args=(done,), daemon=True)
    t.start()
    t.join(timeout=60)
    assert done, "a step loop after streams never saw its requests finish"


def test_shutdown_fails_open_streams_and_refuses_new_requests(tiny):
    engine = make_engine(EngineConfig(target=tiny["moe"]))

    async def main():
        agen = engine.stream([5, 6, 7], SamplingParams(max_tokens=400, ignore_eos=True))
        await anext(agen)
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(RuntimeError, match="shut down"):
            async for _ in agen:
                pass

    asyncio.run(main())
    with pytest.raises(RuntimeError, match="shut down"):
        engine.add_request([1, 2], SamplingParams(max_tokens=2))


def test_stream_interval_sends_fewer_larger_deltas(tiny):
    """After the first delta, every delta but the last carries >= stream_interval tokens."""
    engine = make_engine(EngineConfig(target=tiny["moe"], stream_interval=5))

    async def collect():
        return [out async for out in engine.stream([5, 6, 7], SamplingParams(max_tokens=23,
                                                                             ignore_eos=True))]

    chunks = asyncio.run(collect())
    final = chunks[-1]
    assert final.finished and len(final.token_ids) == 23
    assert [t for c in chunks for t in c.new_token_ids] == final.token_ids
    # the first delta does not wait for 5 (TTFT); it holds more only if the consumer was late
    assert all(len(c.new_token_ids) >= 5 for c in chunks[1:-1])
    assert 2 <= len(chunks) <= 1 + math.ceil((23 - len(chunks[0].new_token_ids)) / 5)
    with pytest.raises(ValueError, match="stream_interval"):
        EngineConfig(target=tiny["moe"], stream_interval=0)


@pytest.mark.parametrize(
    "field,kwargs",
    [
        ("temperature", dict(temperature=-1.0)),
        ("temperature", dict(temperature=math.nan)),
        ("top_p", dict(top_p=0.0)),
        ("top_p", dict(top_p=math.nan)),
        ("top_k", dict(top_k=-2)),
        ("max_tokens", dict(max_tokens=0)),
        ("stop", dict(stop=[""])),
    ],
)
def test_bad_sampling_params_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_requests_name_the_problem(llms):
    engine = llms["plain"].engine
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request([1] * 600, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="outside the vocab"):
        engine.add_request([VOCAB + 5], SamplingParams())
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request("text without a tokenizer", SamplingParams())


def test_bad_models_name_the_field(tiny, tmp_path):
    with pytest.raises(ValueError, match="unsupported target architecture"):
        make_engine(EngineConfig(target=tiny["drafter"]))
    with pytest.raises(ValueError, match="hidden_size"):
        LLM(tiny["moe"], save_drafter(tmp_path / "h", hidden_size=32, head_dim=8))
    with pytest.raises(ValueError, match="vocab_size"):
        LLM(tiny["moe"], save_drafter(tmp_path / "v", vocab_size=VOCAB * 2))
    with pytest.raises(ValueError, match="target_layer_ids"):
        LLM(tiny["moe"], save_drafter(tmp_path / "l", layer_ids=(1, 9)))
    with pytest.raises(ValueError, match="block_size"):
        LLM(tiny["moe"], block_size=4)
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=5e-324),  # logits / T would overflow: decodes greedily
        dict(temperature=1e308, seed=2**80),
        dict(temperature=0.5, top_p=1e-300, top_k=10**9, seed=-5),
    ],
)
def test_extreme_sampling_params_still_generate(llms, kwargs):
    out = llms["dflash"].generate([[1, 2, 3]], SamplingParams(max_tokens=12, **kwargs),
                                  use_tqdm=False)[0]
    assert len(out.token_ids) == 12 and all(0 <= t < VOCAB for t in out.token_ids)
    if kwargs.get("temperature", 1) < 1e-5:
        greedy = llms["dflash"].generate([[1, 2, 3]], SamplingParams(max_tokens=12),
                                         use_tqdm=False)[0]
        assert out.token_ids == greedy.token_ids


def test_one_acceptance_length_for_requests_engine_and_listeners(tiny):
    """Requests' speculation stats add up exactly to the engine's counters and to what the
    step listeners saw, with one definition: tokens committed per verify step with drafts."""
    engine = LLM(tiny["moe"], tiny["drafter"], drafter_dtype="float32",
                 spec_min_confidence=0.02, spec_profile="whole_block").engine
    steps = []
    engine.add_listener(steps.append)
    before = engine.stats().counters
    prompts = [[(3 * i + j) % 30 for j in range(2 + i)] for i in range(5)]
    outs = engine.run_until_finished(
        [engine.add_request(p, SamplingParams(max_tokens=20 + 3 * i, stop_token_ids=[7]))
         for i, p in enumerate(prompts)])
    after = engine.stats().counters
    spec, spec0 = after.spec, before.spec
    lengths = [a for o in outs for a in o.acceptance_lengths]
    assert spec.num_drafts - spec0.num_drafts == len(lengths) > 0
    assert spec.num_accepted_tokens - spec0.num_accepted_tokens == sum(lengths) - len(lengths)
    assert spec.num_accepted_tokens - spec0.num_accepted_tokens == sum(
        o.num_accepted_tokens for o in outs)
    assert spec.num_draft_tokens - spec0.num_draft_tokens == sum(o.num_draft_tokens for o in outs)
    drafts = [d for s in steps for d in s.drafts]
    assert len(drafts) == len(lengths) and sum(a for _, a in drafts) == sum(lengths) - len(lengths)
    assert after.generation_tokens - before.generation_tokens == sum(len(o.token_ids)
                                                                     for o in outs)
    assert sum(len(o.new_token_ids) for s in steps for o in s.outputs) == sum(
        len(o.token_ids) for o in outs)
    for o in outs:
        m = o.metrics
        assert m.arrival_time <= m.scheduled_time <= m.first_token_time <= m.finished_time
        assert m.last_token_time == m.finished_time and m.e2e_seconds >= m.ttft_seconds >= 0
        # every token but the prefill's came from a decode step; drafted steps are a subset
        assert len(o.acceptance_lengths) <= m.num_steps <= len(o.token_ids) - 1
        assert o.acceptance_length == (sum(o.acceptance_lengths) / len(o.acceptance_lengths)
                                       if o.acceptance_lengths else 0.0)
    assert {o.finish_reason for o in outs} <= {"stop", "length"}
    assert after.finished.get("stop", 0) + after.finished.get("length", 0) >= len(outs)


def test_a_failing_listener_never_fails_a_request(tiny, caplog):
    engine = LLM(tiny["moe"]).engine
    calls = []

    def broken(step):
        calls.append(step)
        raise RuntimeError("exporter bug")

    engine.add_listener(broken)
    with caplog.at_level("ERROR"):
        rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=8))
        out = engine.run_until_finished([rid])
    assert len(out[0].token_ids) == 8 and len(calls) == 8  # prefill + 7 decode steps
    assert sum("listener" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_workers_forget_finished_and_aborted_requests_when_the_engine_goes_idle(tiny):
    """Finished and aborted requests reach the workers with the next step, or at once when
    the engine goes idle: the target's pending features never outlive their request."""
    llm = LLM(tiny["moe"], tiny["drafter"], drafter_dtype="float32",
              spec_profile="whole_block")
    engine = llm.engine
    pending = engine.executor.target._pending._parts
    ended = []
    engine.add_listener(lambda step: None, ended.extend)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=1), use_tqdm=False)  # ends at prefill
    assert pending == {}
    rid = engine.add_request([1, 2, 3, 4], SamplingParams(max_tokens=50))
    engine.step()
    engine.step()
    assert list(pending) != []  # its features wait for the drafter's next pass
    assert engine.abort(rid)
    assert pending == {}
    assert [(o.request_id, o.finish_reason) for o in ended] == [(rid, "abort")]

    async def stream_one():
        return [o async for o in engine.stream([5, 6, 7], SamplingParams(max_tokens=9))]

    assert asyncio.run(stream_one())[-1].finished
    deadline = time.monotonic() + 10
    while engine._loop_thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)  # the stepping thread releases on its way out
    assert pending == {}


def test_streams_on_one_event_loop_each_get_every_step_while_requests_arrive():
    """The engine never holds its lock over a step, so an event loop streaming several requests
    (and adding new ones) is never blocked for a step: every stream gets a delta per step, not
    a few merged ones, and the loop's longest stall stays below a step."""
    from dflash_ray import demo_pair

    target, drafter = demo_pair()
    engine = LLM(target, drafter, spec_min_confidence=0.1).engine
    steps, lags, free = [], [], []
    engine.add_listener(lambda s: steps.append(s.seconds))
    execute = engine.executor.execute

    def take_lock():
        # The event loop's thread takes the lock for microseconds (adding a request, reading
        # outputs), so a try without waiting races it (a CI run saw one miss). A lock held over
        # the step is held by this very thread, blocked in join below: no wait frees it, so a
        # one-second wait still fails exactly then.
        got = engine._lock.acquire(timeout=1.0)
        if got:
            engine._lock.release()
        free.append(got)

    def spy(batch):  # while the workers run, another thread can take the engine's lock
        if all(free):  # after one miss, no more waits: the test has failed already
            other = threading.Thread(target=take_lock)
            other.start()
            other.join()
        return execute(batch)

    engine.executor.execute = spy

    async def probe(stop):  # how late a 1 ms sleep wakes up: the loop's stalls
        while not stop.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - t0 - 0.001)

    async def consume(i):
        prompt = [(7 * i + j) % 300 + 5 for j in range(20)]
        return [o async for o in engine.stream(prompt, SamplingParams(max_tokens=64,
                                                                      ignore_eos=True))]

    async def main():
        stop = asyncio.Event()
        lagging = asyncio.create_task(probe(stop))
        streams = []
        for i in range(4):  # requests keep arriving while the others stream
            streams.append(asyncio.create_task(consume(i)))
            await asyncio.sleep(0.03)
        results = await asyncio.gather(*streams)
        stop.set()
        await lagging
        return results

    results = asyncio.run(main())
    assert free and all(free)
    for deltas in results:
        assert sum(len(d.new_token_ids) for d in deltas) == 64
        # the prefill's delta and one per decode step; a few may merge when the consumer's
        # wake-up loses the GIL to the stepping thread (switch interval 5 ms)
        assert len(deltas) >= 0.8 * (deltas[-1].metrics.num_steps + 1)
    # The loop's stalls (`lags`) are measured, not asserted: on a loaded 2-core box the p99
    # stall passed a median step even with the lock free (32 vs 14 ms, a CI run beside a
    # soak). What made the old engine stall the loop for whole steps, its lock held over model
    # execution, is what `free` checks exactly: another thread takes the lock during every step.
    assert steps and lags
