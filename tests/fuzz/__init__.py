"""Fuzzing of the sans-IO SMTP code: a policy-driven session driver, the atheris target, its corpus."""
