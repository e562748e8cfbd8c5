"""Function-preserving reparameterizations T_k per architecture (DESIGN.md §4)."""
