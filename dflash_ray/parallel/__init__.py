"""Collective communication for model code (`Communicator`: local no-op, or a torch.distributed
group over gloo / NCCL). Below models/: imports nothing else of the package."""
