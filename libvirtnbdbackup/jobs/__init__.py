"""Jobs: backup and restore, driving the adapters and the format."""
