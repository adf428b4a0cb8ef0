"""Ground-truth particle simulation and classification scoring."""
