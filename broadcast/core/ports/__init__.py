"""Ports: the small protocols the core needs from the outside world, in the project's own vocabulary, one
module per family (``log``, ``stores``, ``bus``).

Each port has an in-memory adapter (embedded default, unit tests) and a real one (Kafka, SQL, Redis);
``tests/contract`` runs one behavioural suite against both. No vendor type crosses these signatures.
"""
