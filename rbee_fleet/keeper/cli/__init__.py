"""rbee-keeper's command line: the parser and entry point, then one module per group of commands and the
way their output looks. Every command calls the keeper's services, as the TUI does."""
