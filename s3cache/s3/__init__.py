"""Pure S3 protocol helpers: no I/O."""
