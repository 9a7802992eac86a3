"""keystate statebackend."""
