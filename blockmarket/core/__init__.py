"""The base layer: config, logging, the command prologue, files, state vectors, process lifecycle."""
