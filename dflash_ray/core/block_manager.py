"""Cache allocation on ints: which KV blocks and which per-sequence state slot each sequence
owns.

One block holds `block_len` positions in both the target cache and the drafter cache (they share
block ids). A sequence's table grows before a forward writes past its end and shrinks after
rollback; a finished, aborted or preempted sequence returns every block and its slot. Slots are
for caches whose size is per sequence, not per token (a recurrent state); `num_slots` comes from
the bytes such a state takes, or is the sequence limit when the model keeps none.
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_len: int, num_slots: int):
        if num_blocks < 1 or block_len < 1 or num_slots < 1:
            raise ValueError(f"num_blocks ({num_blocks}), block_len ({block_len}) and num_slots "
                             f"({num_slots}) must be >= 1")
        self.num_blocks = num_blocks
        self.block_len = block_len
        self.num_slots = num_slots
        self._free: deque[int] = deque(range(num_blocks))
        self._free_slots: list[int] = list(range(num_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def blocks_for(self, num_positions: int) -> int:
        return (num_positions + self.block_len - 1) // self.block_len

    def extra_blocks(self, table: list[int], num_positions: int) -> int:
        """How many more blocks `table` needs to hold `num_positions` positions."""
        return max(0, self.blocks_for(num_positions) - len(table))

    def can_grow(self, table: list[int], num_positions: int) -> bool:
        return self.extra_blocks(table, num_positions) <= len(self._free)

    def grow(self, table: list[int], num_positions: int) -> None:
        need = self.extra_blocks(table, num_positions)
        if need > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {need}, {len(self._free)} free")
        table.extend(self._free.popleft() for _ in range(need))

    def shrink(self, table: list[int], num_positions: int) -> None:
        """Return the blocks past the first `num_positions` positions."""
        keep = self.blocks_for(num_positions)
        while len(table) > keep:
            self._free.append(table.pop())

    def free(self, table: list[int]) -> None:
        self._free.extend(table)
        table.clear()

    def take_slot(self) -> int:
        if not self._free_slots:
            raise RuntimeError(f"out of sequence state slots (all {self.num_slots} in use)")
        return self._free_slots.pop()

    def free_slot(self, slot: int | None) -> None:
        if slot is not None:
            self._free_slots.append(slot)
