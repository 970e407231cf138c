"""Inputs flowing to results: the pipeline (bounded queue, worker threads, sector logic, outbox commit) and the
sources that feed it (folder, camera)."""
