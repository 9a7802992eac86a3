"""keystate runtime."""
