"""Prefect tasks: one thin ``@task`` per pipeline stage over :class:`redi.pipeline.Pipeline`.

Tasks take the recipe as a plain dict (``Recipe.model_dump``) and upstream artifacts as dicts
(``Artifact.to_dict``) and return artifact dicts, so every value crossing Prefect is JSON. The
project's content-addressed store does the caching (``redi.artifacts``); Prefect's own task
caching is off (``cache_policy=NONE``) because a Prefect cache hit would return an old value
without checking that the files behind it still exist and are intact.
"""
