"""The benchmark scenarios, one module per family; each exposes ``run(ctx) -> Outcome`` functions."""
