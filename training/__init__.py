"""Evolutionary training of BlockMarket agents on the market simulation (writes original-format checkpoints)."""
