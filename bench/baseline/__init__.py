"""The naive baseline the benchmark suite measures ours against (one small Starlette app)."""
