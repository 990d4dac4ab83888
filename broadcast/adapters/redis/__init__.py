"""Redis adapters: the bus and the session slots."""
