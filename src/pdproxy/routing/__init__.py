"""Routing state shared beyond one process: the workers of a host (shared memory) and, from the
engines' KV events, every replica (see README, "How routing state is shared")."""
