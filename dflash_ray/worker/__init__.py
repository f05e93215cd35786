"""The step on a device: the draft and target workers, their caches and the in-process
executor. The workers' public methods are the one RPC surface, called in-process here or in Ray
actors (`dflash_ray.cluster`). Imports torch; never ray."""
