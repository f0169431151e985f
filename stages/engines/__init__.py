"""Engines the stages use, with no stage logic: FAISS (faiss_index), BM25 (bm25), OpenVINO
embedding (openvino) and the token padding both embedding engines share (tokens)."""
