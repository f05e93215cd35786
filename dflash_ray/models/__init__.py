"""Model code: the Qwen3 / Qwen3-MoE target, the DFlash drafter, config parsing and weight loading.

Imports no ray and no process-group code; collectives go through a `Communicator`.
"""
