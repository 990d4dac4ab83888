"""The composition root: the app, its components, roles, the CLI and the process lifecycle."""
