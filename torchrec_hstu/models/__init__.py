"""End-to-end models built on the HSTU modules: retrieval and ranking."""
