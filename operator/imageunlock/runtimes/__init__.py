"""Container runtimes, one module each, all implementing :class:`imageunlock.models.Runtime`.

The unlock service only knows that Protocol; choosing and building a runtime happens at the
edges (the CLI, the operator's startup). A new runtime is a new module here.
"""
