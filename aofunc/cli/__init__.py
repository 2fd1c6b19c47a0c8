"""aofunc.cli."""
