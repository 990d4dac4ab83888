"""Other servers measured beside ours in the same run (the ``peer`` column of the benchmark table)."""
