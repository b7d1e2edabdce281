"""The decoder-only MoE language model and the pure routing/dispatch math it calls."""
