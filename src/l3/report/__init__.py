"""Reports: summary dicts, terminal tables, JSON/CSV files and PNG plots."""
