"""The game's rules: trades, fitness, candidate pairs (numpy only)."""
