"""Reusable blocks of the zoo's methods, one concept a module."""
