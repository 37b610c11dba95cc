"""Scoring tasks: one file per task, each paired with ``conf/task/<name>.yaml``."""
