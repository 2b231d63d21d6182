"""Development tools: an embedded redis-server and the `make serve` launcher."""
