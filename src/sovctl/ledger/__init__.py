"""The token ledger: one record per request through the gateway, in SQLite under the home, and
what `sovctl ledger` and `sovctl cost` read from it."""
