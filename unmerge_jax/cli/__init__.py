"""Thin command-line interface: argument parsing and printing only; the logic is in the library."""
