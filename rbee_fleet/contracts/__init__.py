"""Wire models shared by every program. No I/O, and nothing else of ours is imported here."""
