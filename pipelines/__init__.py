"""Batch jobs that compose the library: scan -> read -> map -> write, timed by a runner."""
