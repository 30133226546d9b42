"""The cache store: SQLite index, sparse block files, eviction. Knows nothing of HTTP."""
