"""Generation backends behind one interface (dibs.rollout.base)."""
