"""aofunc.calibrate."""
