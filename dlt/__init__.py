"""Dead-letter topics: recoverer, DLT store and admin routes; see ARCHITECTURE.md."""
