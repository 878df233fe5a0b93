"""The weights store: content-addressed blobs, the lock that pins names to them, and pulls."""
