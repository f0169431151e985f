"""Search engines the stages use, with no stage logic: FAISS (faiss_index) and BM25 (bm25)."""
