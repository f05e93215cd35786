"""The engine's bookkeeping: requests, sequences, scheduling, KV block allocation, speculation
policy, stopping and statistics. Ints, lists and text only: no torch, no ray, so every module
here is tested in milliseconds and runs beside any executor."""
