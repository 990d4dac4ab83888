"""SQL adapters (SQLAlchemy async; PostgreSQL and SQLite): tables, stores, inbox, outbox, DLT."""
