"""Model code: the Qwen3 / Qwen3-MoE target, the DFlash drafter, config parsing and weight loading.

Imports no ray and no torch.distributed; collectives go through a `Communicator`.
"""
