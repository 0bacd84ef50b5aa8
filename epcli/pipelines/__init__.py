"""The pipelines behind the CLI, one module each: train, attack (and compare), corrupt, report, demo.

These are the only modules where the science (models, training, attacks, corruptions) meets the store.
Every pipeline takes plain values, returns a JSON-serialisable dict, and raises `EpcliError`s for anything
the user can fix. Progress is reported through an optional `progress(task, done, total, info)` callback so
that the CLI can draw bars and scripts can stay silent.
"""
