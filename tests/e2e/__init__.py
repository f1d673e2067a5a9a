"""End-to-end tests: whole topologies of real processes."""
