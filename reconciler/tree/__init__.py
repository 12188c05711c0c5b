"""The desired tree: find, parse and check the files, the JSON Schema, the watcher."""
