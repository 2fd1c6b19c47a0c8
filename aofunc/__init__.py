"""aofunc."""
