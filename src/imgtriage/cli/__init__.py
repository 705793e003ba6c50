"""Typer commands; see ``imgtriage --help``."""
