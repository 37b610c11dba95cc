"""alignment-harness: train LLM alignment methods under matched budgets and score them on one leaderboard."""

__version__ = "0.1.0"
