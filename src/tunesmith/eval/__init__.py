"""``tunesmith eval``: base vs tuned model on identity probes, a retention set and your data."""
