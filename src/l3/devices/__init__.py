"""Device models: capacity, timing and (where they compute) functional behaviour."""
