"""Block manager and scheduler on ints (no models)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dflash_ray.core.block_manager import BlockManager
from dflash_ray.core.outputs import RequestMetrics
from dflash_ray.core.sampling_params import SamplingParams
from dflash_ray.core.scheduler import Scheduler, SchedulerConfig, step_batch
from dflash_ray.core.sequence import Sequence, Status
from dflash_ray.core.step_io import SamplingSpec


def test_block_manager_grow_shrink_free():
    bm = BlockManager(num_blocks=5, block_len=4, num_slots=2)
    table: list[int] = []
    bm.grow(table, 9)  # 3 blocks
    assert len(table) == 3 and bm.num_free == 2
    bm.shrink(table, 4)
    assert len(table) == 1 and bm.num_free == 4
    assert not bm.can_grow(table, 4 * 6)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.grow(table, 4 * 6)
    bm.free(table)
    assert table == [] and bm.num_free == 5
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4, 1)
    a, b = bm.take_slot(), bm.take_slot()
    assert {a, b} == {0, 1} and bm.num_free_slots == 0
    with pytest.raises(RuntimeError, match="out of sequence state slots"):
        bm.take_slot()
    bm.free_slot(a)
    assert bm.take_slot() == a


def seq(i: int, prompt_len: int, max_tokens: int = 10) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens)
    return Sequence(i, list(range(prompt_len)), params, SamplingSpec(0.0, 1.0, 0, 7),
                    RequestMetrics(arrival_time=0.0))


def test_scheduler_mixes_prefill_and_decode_and_preempts_newest():
    bm = BlockManager(num_blocks=6, block_len=4, num_slots=8)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, block_size=4), bm)
    a, b = seq(0, 6), seq(1, 5)
    s.add(a)
    out = s.schedule(0.0)
    assert out.prefills == [a] and not out.decodes
    a.output_ids.append(1)
    a.num_cached = 6
    s.add(b)
    out = s.schedule(0.0)  # a decodes (needs 6 + 4 positions), b is admitted in the same step
    assert [d.seq for d in out.decodes] == [a] and out.prefills == [b]
    b.output_ids.append(2)
    b.num_cached = 5
    a.num_cached = 10
    a.output_ids += [3, 4, 5, 6]
    out = s.schedule(0.0)  # a needs 14 positions = 4 blocks, b 9 = 3: only 6 blocks exist
    assert out.preempted == [b] and b.status is Status.WAITING and b.block_table == []
    assert [d.seq for d in out.decodes] == [a] and s.waiting[0] is b
    assert b.slot is None and bm.num_free_slots == 7  # a holds the only slot in use


def test_scheduler_shortens_the_last_block_to_max_tokens():
    bm = BlockManager(num_blocks=10, block_len=4, num_slots=8)
    s = Scheduler(SchedulerConfig(block_size=8), bm)
    a = seq(0, 3, max_tokens=4)
    s.add(a)
    s.schedule(0.0)
    a.output_ids += [1, 2]
    a.num_cached = 4
    out = s.schedule(0.0)
    assert out.decodes[0].num_queries == 3  # 2 tokens left: bonus + 2 drafts


def test_sequences_admitted_without_a_drafter_and_after_its_loss_decode_plain():
    bm = BlockManager(num_blocks=20, block_len=4, num_slots=8)
    s = Scheduler(SchedulerConfig(block_size=4), bm)
    a, b = seq(0, 3), seq(1, 3)
    s.add(a)
    assert s.schedule(0.0, drafter_up=False).prefills == [a]  # no drafter: a never speculates
    a.output_ids.append(1)
    a.num_cached = 3
    s.add(b)
    out = s.schedule(1.0, drafter_up=True)
    assert out.prefills == [b] and [d.num_queries for d in out.decodes] == [1]
    a.output_ids.append(1)
    a.num_cached = 4
    b.output_ids.append(1)
    b.num_cached = 3
    out = s.schedule(2.0)
    assert {d.seq.seq_id: d.num_queries for d in out.decodes} == {0: 1, 1: 4}
    batch = step_batch(out, released=[9])
    assert [d.drafted_ctx for d in batch.decodes] == [None, 0]
    assert [d.context_rows for d in batch.decodes] == [4, 3]
    assert batch.drafter_decodes() == [1] and batch.drafter_pass and batch.released == [9]
    assert a.metrics.scheduled_time == 0.0 and b.metrics.scheduled_time == 1.0
    s.lose_drafter()  # b's drafter context is gone: plain from now on
    assert [d.num_queries for d in s.schedule(3.0).decodes] == [1, 1]


def test_importing_the_package_loads_no_ray_fastapi_or_triton():
    code = ("import sys, dflash_ray; "
            "print([m for m in ('ray', 'fastapi', 'triton') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_step_result_times_transfers_once_and_not_the_wait():
    from dflash_ray.core.step_io import Span, StepResult

    spans = [Span("target", "verify", 0.0, 4.0),
             Span("channel", "send_features", 1.0, 1.1, nbytes=1000),
             Span("channel", "recv_features", 0.5, 1.3, nbytes=1000),  # waited from 0.5 to 1.0
             Span("drafter", "draft", 1.3, 2.0),
             Span("channel", "send_drafts", 2.0, 2.1, nbytes=64),
             Span("channel", "recv_drafts", 1.2, 2.2, nbytes=64)]
    r = StepResult([], spans)
    assert r.transfer_bytes == 1064  # each message once
    assert abs(r.transfer_seconds - (0.3 + 0.2)) < 1e-9  # from the send's start to the arrival
    assert r.draft_seconds == 0.7 and r.verify_seconds == 4.0
