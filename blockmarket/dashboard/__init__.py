"""`blockmarket dashboard`: the live web view of a market (feed.py: MQTT + /metrics; server.py: the page)."""
