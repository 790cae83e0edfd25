"""A fake Anthropic Messages API on loopback, for tests, benchmarks and manual trials."""
