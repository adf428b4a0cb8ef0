"""Qt-free particle I/O: RELION STAR, cryoSPARC .cs, memory-mapped .mrcs."""
