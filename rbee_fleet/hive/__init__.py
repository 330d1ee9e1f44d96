"""rbee-hive: one per machine. Worker processes, the model catalog, device detection."""
