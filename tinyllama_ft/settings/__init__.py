"""Settings: the one configuration (`Config`), from flags and YAML, each value checked once, before anything loads."""
