"""The project's own SMTP backends: a sink that stores what it gets, and a relay to a next hop."""
