"""The queen's HTTP handlers: thin, each delegating to the queen's services."""
