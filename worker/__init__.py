"""The Celery worker: consumes omni.generate jobs, groups them by adapter, runs the engine, stores outputs."""
