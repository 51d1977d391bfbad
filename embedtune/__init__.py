"""embedtune."""
