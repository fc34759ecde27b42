"""Diffusion tools (imported by the CLI, not by the plug-in)."""
