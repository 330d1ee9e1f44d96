"""The keeper's terminal UI (Textual): the fleet on one screen, live, with every operation at a keystroke."""
