"""Where the data lives: cold page cache, object storage (loopback store, shaper, upload)."""
