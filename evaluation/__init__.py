"""TOFU-style evaluation of unlearning (DESIGN.md §7)."""
