"""The resource governor: sensors (kernel files) and policy (pure functions)."""
