"""Packaging: the wheel's contents and a fresh install of it outside the repository."""
