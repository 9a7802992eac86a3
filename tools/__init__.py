"""keystate tools."""
