"""Writing features: the writer, and the commands that load, warm and size the online store."""
