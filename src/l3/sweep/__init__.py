"""Design-space sweeps: a spec of axes over system-file fields, run point by point on Ray, stored in Parquet."""
