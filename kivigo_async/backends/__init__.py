"""Storage engines: :mod:`~kivigo_async.backends.memory` and :mod:`~kivigo_async.backends.redis`."""
