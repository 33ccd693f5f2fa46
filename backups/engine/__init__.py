"""The backup engine: plain functions that run pg tools and write the repository. No Celery,
no HTTP; the same functions run from a task, a command or a test."""
