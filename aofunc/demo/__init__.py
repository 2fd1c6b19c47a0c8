"""aofunc.demo."""
