"""The serving simulator: scheduler-driven iterations advanced on a simulated clock."""
