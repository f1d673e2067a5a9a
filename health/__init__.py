"""Health checking of backends: active SMTP checks, the load-average agent, the monitor."""
