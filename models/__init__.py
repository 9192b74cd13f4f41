"""cryid.models: audio to embeddings and scores, the run time of the daemon and enrollment (audio,
segmenter, NumPy front end, ONNX embedder, manifest, scoring, calibration map). No torch at import time.

Offline tools live in two subpackages: ``training`` (train, export, calibrate) and ``evaluation``
(``cryid eval``); the run time never imports them."""
