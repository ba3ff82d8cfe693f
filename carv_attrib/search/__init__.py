"""Search over features: preconditioners, the FAISS index, re-ranking, --explain and ranking stability."""
