"""Privacy accounting: DP calibration of the noise and the guarantee of what is released (DESIGN.md §5)."""
