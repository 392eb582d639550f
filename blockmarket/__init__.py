"""BlockMarket's shared layers and the `blockmarket` command (see docs/architecture.md)."""
