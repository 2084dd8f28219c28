"""Where a backup goes: a directory, or a zip archive on standard output."""
