"""Helpers shared by several stages."""
