"""The Ray executor on the shared session cluster (gloo): 1 drafter actor + 3 target shard actors
(the mixed plan: attention over shards 0-1, experts over all 3, shard 2 without attention or KV
cache) must reproduce the single-process engine exactly, and survive its actors dying."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import pytest
import torch
from pydantic import ValidationError

from dflash_ray import LLM, SamplingParams
from dflash_ray.config import EngineConfig
from dflash_ray.core.engine import Engine
from dflash_ray.worker.worker_config import WorkerConfig

from .conftest import WHOLE

ray = pytest.importorskip("ray")

from dflash_ray.cluster import ActorStartError, RayExecutor, StepError  # noqa: E402

pytestmark = pytest.mark.timeout(120)

PROMPTS = [[(5 * i + j) % 30 for j in range(1 + 4 * i)] for i in range(6)]  # lengths 1..21
GREEDY = SamplingParams(max_tokens=40)


def ray_engine(target: str, drafter: str | None, shards: int, **spec) -> Engine:
    """A Ray-executor engine; z-lab's whole block unless `spec` says otherwise (as `LLM` below)."""
    config = EngineConfig(target=target, drafter=drafter, executor="ray",
                          num_target_shards=shards, num_kv_blocks=96, **(WHOLE | spec))
    return Engine(config, executor=RayExecutor(WorkerConfig.from_engine(config), shards))


@pytest.fixture(scope="module")
def sharded(ray_cluster, tiny):
    # 4 heads, 4 experts on 3 shards: the widest plan is TP 2 x EP 3
    engine = ray_engine(tiny["moe"], tiny["drafter"], 3, drafter_dtype="float32")  # as llms
    yield engine
    engine.shutdown()


def generate(engine: Engine, prompts, params) -> list:
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    return engine.run_until_finished(ids)


def test_sharded_ray_equals_single_process(sharded, llms):
    # seeded sampled requests too: rejection sampling on the target side needs the draft
    # distributions that crossed the channel to be exactly the drafter's
    sampled = [
        SamplingParams(max_tokens=30, temperature=0.8, top_k=12, seed=7 + i) for i in range(2)
    ]
    params = [GREEDY] * len(PROMPTS) + sampled
    prompts = PROMPTS + PROMPTS[2:4]
    got = generate(sharded, prompts, params)
    want = llms["dflash"].generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.acceptance_lengths for o in got] == [o.acceptance_lengths for o in want]
    assert any(max(o.acceptance_lengths) > 1 for o in got), "no draft was ever accepted"
    plain = llms["plain"].generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in got[: len(PROMPTS)]] == [o.token_ids for o in plain]
    t = sharded.executor.timing
    assert t.steps > 0 and t.draft > 0 and t.verify > 0 and t.transfer > 0
    plan = sharded.executor.plan
    assert (plan.tp_size, plan.ep_size) == (2, 3)
    kv = [ray.get(s.ready.remote())["kv_bytes_per_token"] for s in sharded.executor._shards]
    assert kv[0] == kv[1] > 0 and kv[2] == 0  # shard 2 holds no attention, so no KV cache


def test_cut_blocks_and_plain_steps_cross_the_actors_like_in_process(
    ray_cluster, tiny, monkeypatch
):
    """Blocks cut by drafter confidence (NO_DRAFT entries over the channel) and steps above
    spec_max_batch (q = 1: the drafter actor only takes in context, once enough waits) give the
    in-process engine's tokens and acceptance lengths, greedy and seeded rejection sampling
    (the shared fixture samples coupled, no distributions on the wire). A bf16 drafter actor,
    fed the fp32 target's features over the channel."""
    from dflash_ray.core import scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "MAX_WAITING_CONTEXT", 24)  # the engines run here
    # rejection sampling: the draft distributions of cut blocks cross the channel, ragged
    spec = {"spec_min_confidence": 0.02, "spec_max_batch": 3, "drafter_dtype": "bfloat16",
            "sampling": "rejection"}
    sampled = [
        SamplingParams(max_tokens=30, temperature=0.8, top_k=12, seed=3 + i) for i in range(2)
    ]
    # staggered lengths: the batch shrinks below the limit while requests still run
    params = [SamplingParams(max_tokens=16 + 6 * i) for i in range(len(PROMPTS))] + sampled
    prompts = PROMPTS + PROMPTS[1:3]
    engine = ray_engine(tiny["moe"], tiny["drafter"], 1, **spec)
    context_only = []  # steps whose every block is q = 1 but that still take in context
    execute = engine.executor.execute

    def spy(batch):
        if batch.drafter_pass and all(d.num_queries == 1 for d in batch.decodes):
            context_only.append(len(batch.decodes))
        return execute(batch)

    engine.executor.execute = spy
    try:
        got = generate(engine, prompts, params)
    finally:
        engine.shutdown()
    assert context_only, "no context-only drafter pass crossed to the actor"
    want = LLM(tiny["moe"], tiny["drafter"], **WHOLE, **spec).generate(prompts, params,
                                                                     use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.acceptance_lengths for o in got] == [o.acceptance_lengths for o in want]
    spec_stats = engine.stats().counters.spec
    assert spec_stats.num_drafts > 0
    assert spec_stats.num_draft_tokens < spec_stats.num_drafts * 7


def kill_and_wait(actor, timeout_s: float = 30.0) -> None:
    """`ray.kill`, then wait until the actor's process is gone. Ray reports the actor dead
    before its process has exited, and the process's own threads (its step loop, reading its
    connection) run until then: a step in that window still gets drafts (seen in CI)."""
    pid = ray.get(actor.ready.remote())["pid"]
    ray.kill(actor)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{actor}'s process {pid} still runs {timeout_s:g} s after ray.kill")


def exported(engine: Engine):
    """Attach an exporter (prometheus_client) to `engine`; returns a function reading it."""
    from prometheus_client import generate_latest

    from dflash_ray.metrics.exporter import Exporter
    from dflash_ray.metrics.prometheus import PrometheusBackend

    from .test_metrics import samples

    backend = PrometheusBackend()
    exporter = Exporter(backend, "tiny")
    engine.add_listener(exporter.on_step)
    def read() -> dict:
        exporter.sample(engine)
        return samples(generate_latest(backend.registry).decode(), prefix="")

    return read, exporter


def test_killed_drafter_falls_back_to_plain_then_speculates_again(sharded, llms):
    plain = llms["plain"].generate(PROMPTS, GREEDY, use_tqdm=False)
    read, exporter = exported(sharded)
    ex = sharded.executor
    ids = [sharded.add_request(p, GREEDY) for p in PROMPTS[:3]]
    for _ in range(3):
        sharded.step()
    drafter = ex.actors()["drafter"]
    kill_and_wait(drafter)  # the kill is asynchronous: dead before the next step
    ids += [sharded.add_request(p, GREEDY) for p in PROMPTS[3:]]  # admitted while it is down
    outs = sharded.run_until_finished(ids)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    # speculation stopped with the kill (at most the two decode steps before it verified
    # drafts), and never started for requests admitted after it
    assert all(len(o.acceptance_lengths) <= 2 for o in outs[:3])
    assert all(o.acceptance_lengths == [] for o in outs[3:])
    assert sharded.stats().counters.num_drafter_losses >= 1
    assert read()["dflash_drafter_fallbacks_total"] == 1
    assert ex.wait_for_drafter(60)
    again = generate(sharded, PROMPTS, GREEDY)
    assert read()["dflash_drafter_restarts_total"] == 1  # the engine saw it come back
    account = ex.last_restart  # where the restart's seconds went
    assert account["total_s"] > 0 and account["load_s"] >= 0 and account["connect_s"] >= 0
    assert [o.token_ids for o in again] == [o.token_ids for o in plain]
    want = llms["dflash"].generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.acceptance_lengths for o in again] == [o.acceptance_lengths for o in want]
    sharded.remove_listener(exporter.on_step)


def test_drafter_killed_during_a_step(sharded, llms):
    plain = llms["plain"].generate(PROMPTS, GREEDY, use_tqdm=False)
    ex = sharded.executor
    assert ex.wait_for_drafter(60)
    drafter = ex.actors()["drafter"]
    ids = [sharded.add_request(p, GREEDY) for p in PROMPTS]
    sharded.step()
    killer = threading.Timer(0.05, ray.kill, args=(drafter,))
    killer.start()
    outs = sharded.run_until_finished(ids)
    killer.join()
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert ex.wait_for_drafter(60)


def test_drafter_killed_while_the_batch_decodes_plain_is_replaced(sharded, llms, monkeypatch):
    """Above spec_max_batch no step calls the drafter, so only the executor's probe can see it
    die: a new drafter must be connected while the batch still decodes plain (before the fix
    it came back only once a step drafted again: 46-51 s through Serve at concurrency 8), and
    every request keeps its plain text."""
    from dflash_ray.core.spec_policy import make_policy

    monkeypatch.setattr(sharded.scheduler, "policy", make_policy(2))  # 6 live: all plain
    ex = sharded.executor
    assert ex.wait_for_drafter(60)
    plain = llms["plain"].generate(PROMPTS, GREEDY, use_tqdm=False)
    want = {tuple(p): o.token_ids for p, o in zip(PROMPTS, plain, strict=True)}
    drafter_passes = []
    execute = ex.execute

    def spy(batch):
        drafter_passes.append(batch.drafter_pass)
        return execute(batch)

    monkeypatch.setattr(ex, "execute", spy)
    live, done, n = {}, [], 0

    def step() -> None:
        nonlocal n
        while len(live) < len(PROMPTS):  # keep the batch above spec_max_batch
            prompt = PROMPTS[n % len(PROMPTS)]
            live[sharded.add_request(prompt, GREEDY)] = prompt
            n += 1
        for out in sharded.step():
            if out.finished:
                done.append((live.pop(out.request_id), out))

    for _ in range(3):
        step()
    drafter = ex.actors()["drafter"]
    kill_and_wait(drafter)
    deadline = time.monotonic() + 90  # a hang guard: the restart itself takes seconds
    while ex.actors().get("drafter") in (None, drafter) and time.monotonic() < deadline:
        step()
    assert ex.actors().get("drafter") not in (None, drafter), "no new drafter while plain"
    assert not any(drafter_passes), "a step called the drafter: the test lost its point"
    assert sharded.stats().counters.num_drafter_losses >= 1
    while live:
        step()
    assert done and all(out.token_ids == want[tuple(p)] for p, out in done)


def test_killed_target_shard_recomputes_the_running_requests_on_a_rebuilt_group(sharded, llms):
    """A shard dies mid-run: the step fails within moments, the group is rebuilt, and the
    running requests are recomputed from their committed tokens (as after a preemption), so
    nothing is lost and the text is the one they would have had."""
    ex = sharded.executor
    ids = [sharded.add_request(p, GREEDY) for p in PROMPTS]
    sharded.step()
    sharded.step()
    ray.kill(ex.actors()["target shard 2"])  # the shard without attention
    start = time.monotonic()
    outs = sharded.run_until_finished(ids)
    assert time.monotonic() - start < 90
    want = llms["dflash"].generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in want]
    assert all(o.finish_reason == "length" and o.metrics.num_preemptions >= 1 for o in outs)
    assert sharded.blocks.num_free == sharded.blocks.num_blocks


def test_killed_target_shard_without_retries_fails_the_step_fast_then_rebuilds(sharded, llms):
    ex = sharded.executor
    sharded.config.step_retries = 0
    try:
        ids = [sharded.add_request(p, GREEDY) for p in PROMPTS]
        sharded.step()
        sharded.step()
        ray.kill(ex.actors()["target shard 1"])
        start = time.monotonic()
        with pytest.raises(StepError, match="target shard 1 failed"):
            sharded.run_until_finished(ids)
        assert time.monotonic() - start < 30
    finally:
        sharded.config.step_retries = 2
    assert sharded.blocks.num_free == sharded.blocks.num_blocks
    # the next requests rebuild the group and succeed
    again = generate(sharded, PROMPTS[:3], GREEDY)
    want = llms["dflash"].generate(PROMPTS[:3], GREEDY, use_tqdm=False)
    assert [o.token_ids for o in again] == [o.token_ids for o in want]
    assert [o.acceptance_lengths for o in again] == [o.acceptance_lengths for o in want]


def test_hung_target_shard_times_out_and_its_requests_are_recomputed(sharded, llms):
    """A shard that stops answering (SIGSTOP) fails the step at the step deadline; the
    running requests then finish on the rebuilt group with their own text."""
    ex = sharded.executor
    shard = ex.actors()["target shard 1"]
    pid = ray.get(shard.ready.remote())["pid"]
    ids = [sharded.add_request(p, GREEDY) for p in PROMPTS[:2]]
    sharded.step()
    ex.cfg.step_timeout_s = 3.0
    os.kill(pid, signal.SIGSTOP)  # the executor's teardown SIGKILLs it
    try:
        outs = sharded.run_until_finished(ids)
    finally:
        ex.cfg.step_timeout_s = 30.0
    want = llms["dflash"].generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in want]
    assert all(o.metrics.num_preemptions >= 1 for o in outs)


@pytest.mark.parametrize("step_calls", ["actor_calls", "compiled_graph"])
def test_other_step_calls_equal_the_step_loops(ray_cluster, tiny, llms, sharded, step_calls):
    """One actor call per actor per step, or Ray compiled graphs, run the same steps as the
    default (each actor's step loop fed over its connection: the module's other tests), and
    survive the drafter dying."""
    assert sharded.executor.step_calls == "connections"
    config = EngineConfig(target=tiny["moe"], drafter=tiny["drafter"], executor="ray",
                          num_kv_blocks=96, drafter_dtype="float32", **WHOLE)
    engine = Engine(config, executor=RayExecutor(WorkerConfig.from_engine(config), 1,
                                                 step_calls=step_calls))
    try:
        ex = engine.executor
        assert ex.step_calls == step_calls
        got = generate(engine, PROMPTS, GREEDY)
        ids = [engine.add_request(p, GREEDY) for p in PROMPTS[:3]]
        engine.step()
        drafter = ex.actors()["drafter"]
        kill_and_wait(drafter)
        plain_after_kill = engine.run_until_finished(ids)
        assert ex.wait_for_drafter(60)
        again = generate(engine, PROMPTS[:3], GREEDY)
    finally:
        engine.shutdown()
    want = llms["dflash"].generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.acceptance_lengths for o in got] == [o.acceptance_lengths for o in want]
    assert [o.token_ids for o in plain_after_kill] == [o.token_ids for o in want[:3]]
    assert [o.acceptance_lengths for o in again] == [o.acceptance_lengths for o in want[:3]]


def test_plain_decoding_one_shard(ray_cluster, tiny, llms):
    engine = ray_engine(tiny["moe"], None, 1)
    try:
        got = generate(engine, PROMPTS[:3], GREEDY)
    finally:
        engine.shutdown()
    want = llms["plain"].generate(PROMPTS[:3], GREEDY, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_overlapped_steps_over_the_actors_equal_in_process(ray_cluster, tiny, llms):
    """`overlap` with the Ray executor: the step thread waits on the actors while the engine
    settles the step before; greedy and seeded text equal the in-process engine's, and every
    block comes back."""
    engine = ray_engine(tiny["moe"], tiny["drafter"], 1, drafter_dtype="float32", overlap=True)
    params = [GREEDY] * 3 + [SamplingParams(max_tokens=30, temperature=0.8, top_k=12, seed=7 + i)
                             for i in range(3)]
    try:
        got = generate(engine, PROMPTS, params)
        engine._flush_released()
        assert engine._inflight is None
        assert engine.blocks.num_free == engine.blocks.num_blocks
    finally:
        engine.shutdown()
    want = llms["dflash"].generate(PROMPTS, params, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert any(max(o.acceptance_lengths) > 1 for o in got), "no draft was ever accepted"


def test_unplaceable_actors_time_out_naming_the_placement(ray_cluster, tiny):
    rc = WorkerConfig(target=tiny["moe"], drafter=tiny["drafter"], num_kv_blocks=8)
    with pytest.raises(ActorStartError, match=r"placement group .* not placed within 1 s"):
        RayExecutor(rc, 2, num_cpus_per_actor=64, start_timeout_s=1)


def test_actor_start_timeout_and_failure_name_the_actor(ray_cluster, tiny, tmp_path):
    rc = WorkerConfig(target=tiny["moe"], drafter=tiny["drafter"], num_kv_blocks=8)
    with pytest.raises(ActorStartError, match=r"drafter, target shard 0 did not start within"):
        RayExecutor(rc, 1, start_timeout_s=0.5)
    broken = tmp_path / "drafter"
    broken.mkdir()
    shutil.copy(f"{tiny['drafter']}/config.json", broken)  # config only: weights missing
    rc = WorkerConfig(target=tiny["moe"], drafter=str(broken), num_kv_blocks=8)
    with pytest.raises(ActorStartError, match=r"drafter failed to start: .*no \*\.safetensors"):
        RayExecutor(rc, 1)


def test_plan_errors_fail_before_any_actor_starts(tiny):
    rc = WorkerConfig(target=tiny["moe"], drafter=tiny["drafter"])
    with pytest.raises(
        ValidationError, match="num_attention_heads 4 is not divisible by tp_size 3"
    ):
        RayExecutor(rc, 3, tp_size=3)
    with pytest.raises(ValidationError, match="ep_size 1 != num_target_shards 2"):
        RayExecutor(rc, 2, ep_size=1)
    with pytest.raises(ValidationError, match="tp_size 3 > num_target_shards 2"):
        RayExecutor(rc, 2, tp_size=3)
    with pytest.raises(ValidationError, match="ep_size 5 exceeds num_experts 4"):
        RayExecutor(rc, 5)
    with pytest.raises(ValueError, match="transport 'nccl' needs device='cuda'"):
        RayExecutor(rc, 1, transport="nccl")


@pytest.mark.parametrize("gpus_per_actor", [0.5, 1.0])
def test_gpu_drafter_and_shard_match_cpu(ray_cluster, tiny, llms, gpus_per_actor):
    """On one GPU the two actors share it and talk gloo through host memory (NCCL refuses two
    ranks on one device); with a GPU each, the channel is NCCL."""
    if torch.cuda.device_count() < 2 * gpus_per_actor:
        pytest.skip(f"needs {2 * gpus_per_actor:g} GPUs")
    rc = WorkerConfig(target=tiny["moe"], drafter=tiny["drafter"], device="cuda", num_kv_blocks=96)
    executor = RayExecutor(rc, 1, num_gpus_per_actor=gpus_per_actor)
    assert executor.backend == ("nccl" if gpus_per_actor == 1 else "gloo")
    engine = Engine(
        EngineConfig(target=tiny["moe"], drafter=tiny["drafter"], device="cuda", **WHOLE),
        executor=executor
    )
    try:
        got = generate(engine, PROMPTS, GREEDY)
        timing = executor.timing
    finally:
        engine.shutdown()
    want = llms["dflash"].generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    print(f"transfer {1e3 * timing.transfer / timing.steps:.3f} ms/step over {timing.steps} steps")


def record_steps(engine: Engine) -> list[dict]:
    """Per executed step: {worker: [methods it ran, in order]} from the step's spans."""
    steps = []
    execute = engine.executor.execute

    def spy(batch):
        result = execute(batch)
        ran: dict[str, list[str]] = {}
        for s in sorted(result.spans, key=lambda s: s.start):
            ran.setdefault(s.worker, []).append(s.method)
        steps.append(ran)
        return result

    engine.executor.execute = spy
    return steps


def test_ray_and_in_process_steps_run_the_same_worker_methods(sharded, tiny):
    """One orchestration: the steps of the same requests run the same worker methods in the
    same order in one process and across the actors (Ray adds only the channel's transfers)."""
    local = LLM(tiny["moe"], tiny["drafter"], drafter_dtype="float32",
                spec_profile="whole_block").engine
    params = [GREEDY, SamplingParams(max_tokens=40, temperature=0.8, seed=5)]
    ran = {}
    for name, engine in (("local", local), ("ray", sharded)):
        steps = record_steps(engine)
        try:
            generate(engine, PROMPTS[:2], params)
        finally:
            del engine.executor.execute  # the spy
        ran[name] = steps
    workers = [{w: m for w, m in s.items() if w != "channel"} for s in ran["ray"]]
    assert workers == ran["local"]
    drafted = [s for s in ran["local"] if "drafter" in s]
    assert drafted and all(s["target"] == ["release", "take_features", "share_drafts", "verify"]
                           and s["drafter"] == ["draft"] for s in drafted)
    channel = [s["channel"] for s in ran["ray"] if "drafter" in s]
    assert all(sorted(c) == ["recv_drafts", "recv_features", "send_drafts", "send_features"]
               for c in channel)
    counters = sharded.stats().counters
    assert counters.transfer_bytes > 0 and counters.transfer_seconds > 0


def test_ray_executor_exports_transfer_metrics(sharded):
    read, exporter = exported(sharded)
    try:
        generate(sharded, PROMPTS[:3], GREEDY)
    finally:
        sharded.remove_listener(exporter.on_step)
    s = read()
    assert s["dflash_hidden_state_transfer_bytes_total"] > 0
    assert s["dflash_hidden_state_transfer_seconds_count"] > 0
    assert s["dflash_drafter_up"] == 1


def test_qwen35_hybrid_sharded_over_ray_equals_in_process(ray_cluster, tiny):
    """A Qwen3.5-MoE over 3 target shard actors (attention and DeltaNet heads over 2, experts
    over 3) beside the drafter actor: the same tokens and acceptance lengths as in-process,
    and the shard beyond tp_size holds neither KV cache nor recurrent state."""
    from dflash_ray import LLM

    engine = ray_engine(tiny["qwen35"], tiny["drafter"], 3, drafter_dtype="float32")
    try:
        got = generate(engine, PROMPTS, GREEDY)
        local = LLM(tiny["qwen35"], tiny["drafter"], drafter_dtype="float32", **WHOLE)
        want = local.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert [o.acceptance_lengths for o in got] == [o.acceptance_lengths for o in want]
        plan = engine.executor.plan
        assert (plan.tp_size, plan.ep_size) == (2, 3)
        ready = [ray.get(s.ready.remote()) for s in engine.executor._shards]
        state = [r["state_bytes_per_seq"] for r in ready]
        assert state[0] == state[1] > 0 and state[2] == 0
        assert ready[2]["kv_bytes_per_token"] == 0
    finally:
        engine.shutdown()
