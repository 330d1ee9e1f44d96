"""rbee-keeper: the operator's tool (CLI and TUI) over one service layer."""
