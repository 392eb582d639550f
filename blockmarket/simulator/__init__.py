"""The market side: the game server that publishes ticks and applies matrices."""
