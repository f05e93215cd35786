"""KV-cache block allocation on ints: which physical blocks each sequence owns.

One block holds `block_len` positions in both the target cache and the drafter cache (they share
block ids). A sequence's table grows before a forward writes past its end and shrinks after
rollback; a finished, aborted or preempted sequence returns every block.
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_len: int):
        if num_blocks < 1 or block_len < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_len ({block_len}) must be >= 1")
        self.num_blocks = num_blocks
        self.block_len = block_len
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

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
