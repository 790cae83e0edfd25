"""Runs of isolated subagent loops from a pinned snapshot, bounded, budgeted and durable."""
