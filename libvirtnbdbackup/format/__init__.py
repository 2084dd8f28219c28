"""The on-disk stream format (version 2) shared with virtnbdbackup 2.x."""
