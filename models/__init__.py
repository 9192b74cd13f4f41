"""cryid.models: audio to embeddings and scores (segmenter, NumPy front end, ONNX embedder,
scoring, export, training, CryCeleb evaluation). No torch at import time."""
