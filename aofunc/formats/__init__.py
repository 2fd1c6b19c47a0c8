"""aofunc.formats."""
