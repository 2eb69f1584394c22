"""The producer side of omni-batch: the job schema, the client that enqueues jobs, the CLI.

It imports neither the engine nor the worker, and needs no torch.
"""
