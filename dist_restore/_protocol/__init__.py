"""The collective protocol's parts: the process-group wrapper with timeouts, the
exchange of shared buckets, the aggregated report. coordinator.py drives them."""
