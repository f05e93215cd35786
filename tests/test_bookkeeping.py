"""Block manager and scheduler on ints (no models)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dflash_ray.core.block_manager import BlockManager
from dflash_ray.core.sampling_params import SamplingParams
from dflash_ray.core.scheduler import Scheduler, SchedulerConfig
from dflash_ray.core.sequence import Sequence, Status


def test_bookkeeping_modules_do_not_import_torch():
    # dflash_ray/__init__ imports the engine (torch); load the modules without it
    code = (
        "import sys, types\n"
        "pkg = types.ModuleType('dflash_ray'); pkg.__path__ = ['dflash_ray']\n"
        "sys.modules['dflash_ray'] = pkg\n"
        "import dflash_ray.core.scheduler, dflash_ray.core.block_manager, dflash_ray.core.sequence\n"
        "import dflash_ray.core.spec_policy\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_block_manager_grow_shrink_free():
    bm = BlockManager(num_blocks=5, block_len=4)
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
        BlockManager(0, 4)


def seq(i: int, prompt_len: int, max_tokens: int = 10) -> Sequence:
    return Sequence(i, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens), 0.0)


def test_scheduler_mixes_prefill_and_decode_and_preempts_newest():
    bm = BlockManager(num_blocks=6, block_len=4)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, block_size=4), bm)
    a, b = seq(0, 6), seq(1, 5)
    s.add(a)
    out = s.schedule()
    assert out.prefills == [a] and not out.decodes
    a.output_ids.append(1)
    a.num_cached = 6
    s.add(b)
    out = s.schedule()  # a decodes (needs 6 + 4 positions), b is admitted in the same step
    assert [d.seq for d in out.decodes] == [a] and out.prefills == [b]
    b.output_ids.append(2)
    b.num_cached = 5
    a.num_cached = 10
    a.output_ids += [3, 4, 5, 6]
    out = s.schedule()  # a needs 14 positions = 4 blocks, b 9 = 3: only 6 blocks exist
    assert out.preempted == [b] and b.status is Status.WAITING and b.block_table == []
    assert [d.seq for d in out.decodes] == [a] and s.waiting[0] is b


def test_scheduler_shortens_the_last_block_to_max_tokens():
    bm = BlockManager(num_blocks=10, block_len=4)
    s = Scheduler(SchedulerConfig(block_size=8), bm)
    a = seq(0, 3, max_tokens=4)
    s.add(a)
    s.schedule()
    a.output_ids += [1, 2]
    a.num_cached = 4
    out = s.schedule()
    assert out.decodes[0].num_queries == 3  # 2 tokens left: bonus + 2 drafts


def test_importing_the_package_loads_no_ray_fastapi_or_triton():
    code = ("import sys, dflash_ray; "
            "print([m for m in ('ray', 'fastapi', 'triton') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
